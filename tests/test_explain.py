"""Why a photo matched (issue 14): the query words that carried the score and what the photo shows,
checked on clear cases of real Flickr8k test photos: a dog photo is explained by "dog"."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cbir.cli import app
from cbir.explain import class_names, explain, word_contributions

QUERY = "a dog running on the grass"
DOG_CLASSES = range(151, 269)  # the dog breeds of ImageNet-1k


@pytest.fixture(scope="module")
def photos(flickr8k_slice_dir, tmp_path_factory):
    """The slice's 30 Flickr8k test photos indexed with the shipped default model, and which of them
    every caption calls a dog, and which none does."""
    from cbir.datasets import load_dataset
    from cbir.demo import photo_folder
    from cbir.index import build_index

    test = load_dataset(flickr8k_slice_dir).split("test")
    root = tmp_path_factory.mktemp("explain")
    ix = build_index(photo_folder(test, root / "photos"), root / "index", progress=False)

    def mentions_dog(i: int) -> list[bool]:
        return ["dog" in c.lower() for c in test.captions_of(i)]

    dogs = [test.images[i].name for i in range(len(test.images)) if all(mentions_dog(i))]
    others = [test.images[i].name for i in range(len(test.images)) if not any(mentions_dog(i))]
    assert len(dogs) >= 3 and len(others) >= 10
    return ix, dogs, others


def explained(ix, query: str = QUERY) -> dict:
    results = ix.search_text(query, k=len(ix))
    return dict(zip([r.id for r in results], explain(ix, results, query), strict=True))


def test_a_dog_photo_is_explained_by_dog(photos):
    ix, dogs, others = photos
    why = explained(ix)
    for name in dogs:
        assert why[name].query_words[0][0] == "dog", (name, why[name].query_words)
        assert "dog" in [w for w, _ in why[name].words], (name, why[name].words)
        assert class_names().index(why[name].classes[0][0]) in DOG_CLASSES, (name, why[name].classes)
    no_dog = [name for name in others if "dog" in [w for w, _ in why[name].words]]
    assert len(no_dog) <= len(others) // 5, no_dog


def test_each_query_word_weighs_what_its_removal_costs(photos):
    ix, dogs, _ = photos
    image = ix.vector(dogs[0])
    (contributions,) = word_contributions(ix.model, QUERY, image[None], top=10)
    full = float(image @ ix.embed_text(QUERY) / np.linalg.norm(ix.embed_text(QUERY)))
    words = QUERY.split()
    drops = {}
    for i, word in enumerate(words):
        query = ix.embed_text(" ".join(words[:i] + words[i + 1 :]))
        drops[word] = max(full - float(image @ query / np.linalg.norm(query)), 0.0)
    total = sum(drops.values())
    for word, share in contributions:
        assert share == pytest.approx(drops[word] / total, abs=1e-3) and share >= 0.05
    assert contributions[0][0] == "dog" and len(contributions) == sum(
        d / total >= 0.05 for d in drops.values()
    )


def test_cli_explain_prints_a_line_per_result_and_a_json_field(photos):
    ix, dogs, _ = photos
    result = CliRunner().invoke(app, ["search", QUERY, "--index", str(ix.path), "-k", "3", "--explain"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 6 and lines[1].strip().startswith("matched dog ")
    assert " · sees " in lines[1] and " · near " in lines[1]
    rows = json.loads(
        CliRunner()
        .invoke(app, ["search", QUERY, "--index", str(ix.path), "-k", "2", "--explain", "--json"])
        .stdout
    )
    assert rows[0]["explanation"]["query_words"][0]["word"] == "dog"
    assert {"label", "probability"} == set(rows[0]["explanation"]["classes"][0])
    photo = CliRunner().invoke(
        app, ["search", "--image", str(ix.root / dogs[0]), "--index", str(ix.path), "-k", "1", "--explain"]
    )
    assert photo.exit_code == 0 and photo.stdout.splitlines()[1].strip().startswith("sees ")
