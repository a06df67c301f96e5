"""Why a photo matched (issue 14): the query words that carried the score and what the photo shows,
checked on clear cases of real Flickr8k test photos: a dog photo is explained by "dog"."""

from __future__ import annotations

import json
import re

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


def dog_words() -> set[str]:
    """Words that name a dog: "dog" and the words of ImageNet's dog breed names."""
    names = " ".join(class_names()[i] for i in DOG_CLASSES).lower()
    return {"dog", "dogs", "puppy", "puppies", *re.findall(r"[a-z]+", names)} - {"dog"} | {"dog"}


def test_a_dog_photo_is_explained_by_dog(photos):
    """Every photo whose captions all say "dog" is seen as a dog breed; "dog" carries the query for
    most, and most have a dog word among their nearest words; photos no caption calls a dog rarely do."""
    ix, dogs, others = photos
    why = explained(ix)
    for name in dogs:
        assert class_names().index(why[name].classes[0][0]) in DOG_CLASSES, (name, why[name].classes)
    led_by_dog = [name for name in dogs if why[name].query_words[:1] and why[name].query_words[0][0] == "dog"]
    assert len(led_by_dog) >= 0.75 * len(dogs), {n: why[n].query_words for n in dogs}
    near_dog = [name for name in dogs if dog_words() & {w for w, _ in why[name].words}]
    assert len(near_dog) >= 0.5 * len(dogs), {n: why[n].words for n in dogs}
    other_near_dog = [name for name in others if dog_words() & {w for w, _ in why[name].words}]
    assert len(other_near_dog) <= 0.2 * len(others), {n: why[n].words for n in other_near_dog}


def test_each_query_word_weighs_its_share_of_what_its_removal_costs(photos):
    """Recomputed by hand: the query without each content word, the drop of the photo's similarity,
    each word's share of the summed drops; stop words are never weighed."""
    ix, dogs, _ = photos
    content = ["dog", "running", "grass"]
    for name in dogs:
        image = ix.vector(name)
        (contributions,) = word_contributions(ix.model, QUERY, image[None], top=10)

        def similarity(text: str, image: np.ndarray = image) -> float:
            query = ix.embed_text(text)
            return float(image @ query / np.linalg.norm(query))

        full = similarity(QUERY)
        drops = {w: max(full - similarity(" ".join(QUERY.replace(w, "", 1).split())), 0.0) for w in content}
        total = sum(drops.values())
        expected = sorted((w for w in content if total and drops[w] / total >= 0.05), key=lambda w: -drops[w])
        assert [w for w, _ in contributions] == expected
        for word, share in contributions:
            assert share == pytest.approx(drops[word] / total, abs=1e-3)


def test_cli_explain_prints_a_line_per_result_and_a_json_field(photos):
    ix, dogs, _ = photos
    result = CliRunner().invoke(app, ["search", QUERY, "--index", str(ix.path), "-k", "3", "--explain"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    matched = lines[1].strip().split(" · ")[0]
    assert len(lines) == 6 and matched.startswith("matched ") and "dog" in matched
    assert " · sees " in lines[1] and " · near " in lines[1]
    rows = json.loads(
        CliRunner()
        .invoke(app, ["search", QUERY, "--index", str(ix.path), "-k", "2", "--explain", "--json"])
        .stdout
    )
    assert "dog" in {w["word"] for w in rows[0]["explanation"]["query_words"]}
    assert {"label", "probability"} == set(rows[0]["explanation"]["classes"][0])
    photo = CliRunner().invoke(
        app, ["search", "--image", str(ix.root / dogs[0]), "--index", str(ix.path), "-k", "1", "--explain"]
    )
    assert photo.exit_code == 0 and photo.stdout.splitlines()[1].strip().startswith("sees ")
