"""Steering a search (issue 14): query arithmetic, relevance feedback, filters, paging; CLI and Python."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cbir.cli import app
from cbir.feedback import Rocchio
from cbir.filters import FilterError, Filters
from cbir.index import SearchIndex, update_index
from cbir.query import QueryError, Term, parse_query, photo_share, unit
from tests.conftest import write_legacy_manifest
from tests.test_search import photos, zero_shot_dir  # noqa: F401 (a fixture)

runner = CliRunner()


# ---- the query grammar --------------------------------------------------------------------------
def test_terms_weights_quotes_and_photos_parse():
    assert parse_query('"a dog" + "on the beach" - "people"') == [
        Term("text", "a dog"),
        Term("text", "on the beach"),
        Term("text", "people", -1.0),
    ]
    assert parse_query(["a dog", "+", "snow:0.5", "-", "img:/tmp/x.jpg:2"]) == [
        Term("text", "a dog"),
        Term("text", "snow", 0.5),
        Term("img", "/tmp/x.jpg", -2.0),
    ]
    assert parse_query('"snow":0.5 + id:trip/0.jpg') == [Term("text", "snow", 0.5), Term("id", "trip/0.jpg")]
    assert parse_query("id:15.jpg:2 + snow:1e-1") == [Term("id", "15.jpg", 2.0), Term("text", "snow", 0.1)]
    assert parse_query("a 16:9 photo") == [Term("text", "a 16:9 photo")]
    # Hyphens and plus signs inside words are words; a leading operator is allowed.
    assert parse_query("a well-lit t-shirt") == [Term("text", "a well-lit t-shirt")]
    assert parse_query("- people + dogs") == [Term("text", "people", -1.0), Term("text", "dogs")]


def test_photo_share_says_how_much_of_a_query_is_photos():
    assert photo_share(parse_query('"a dog" + beach - people')) == 0
    assert photo_share(parse_query("a dog + img:x.jpg:0.5")) == pytest.approx(1 / 3)
    assert photo_share(parse_query("id:1.jpg - people")) == 0.5
    rocchio = Rocchio(alpha=1, beta=2, gamma=1)
    assert rocchio.photo_share(0.0, good=True, bad=False) == pytest.approx(2 / 3)
    assert rocchio.photo_share(0.0, good=True, bad=True) == pytest.approx(3 / 4)
    assert rocchio.photo_share(None, good=True, bad=False) == 1.0  # feedback alone is photos only


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("", "empty query"),
        ("a dog + + beach", "an operator with nothing after it"),
        ("a dog -", "an operator with nothing after it"),
        ("id:0.5", "an empty term"),
        ("snow:0", "a weight must be a positive number"),
        ("snow:-1", "a weight must be a positive number"),
        ("- people", "at least one term to look for"),
        ('"a dog + beach', "unbalanced double quote"),
        ("img:", "an empty term"),
    ],
)
def test_malformed_queries_say_what_is_wrong(query, message):
    with pytest.raises(QueryError, match=message):
        parse_query(query)


# ---- searches through SearchIndex.find ----------------------------------------------------------
@pytest.fixture(scope="module")
def steer_index(tmp_path_factory, zero_shot_dir) -> SearchIndex:  # noqa: F811
    """30 real photos (COCO), ten of them in `trip/`, with EXIF dates and cameras on a few."""
    root = tmp_path_factory.mktemp("steer") / "photos"
    (root / "trip").mkdir(parents=True)
    for i, p in enumerate(photos(30)):
        target = (root / "trip" if i < 10 else root) / p.name
        shutil.copy(p, target)
        if i in (0, 1, 12):
            write_exif(target, "2021:07:04 10:00:00", "Canon", "EOS 5D")
        elif i in (2, 13):
            write_exif(target, "2019:01:02 08:30:00", "NIKON CORPORATION", "D750")
    for p in root.rglob("*.jpg"):  # file dates: all in 2023 unless EXIF says otherwise
        os.utime(p, (1_680_000_000, 1_680_000_000))
    ix, _ = update_index(root, tmp_path_factory.mktemp("steer-ix") / "ix", zero_shot_dir, progress=False)
    return ix


def write_exif(path: Path, taken: str, make: str, model: str) -> None:
    with Image.open(path) as im:
        im.load()
        exif = im.getexif()
        exif[271], exif[272] = make, model
        exif.get_ifd(0x8769)[36867] = taken
        im.save(path, exif=exif)


def test_a_plain_sentence_ranks_as_search_text(steer_index):
    query = "a plate of food on a table"
    assert steer_index.find(query, k=10) == steer_index.search_text(query, k=10)


def test_arithmetic_is_the_weighted_sum_of_unit_vectors(steer_index):
    ix = steer_index
    expected = unit(ix.embed_text("a dog")) + 0.5 * unit(ix.embed_text("snow")) - unit(ix.vector("15.jpg"))
    found = ix.find('"a dog" + snow:0.5 - id:15.jpg', k=30)
    assert [r.id for r in found] == [r.id for r in ix.search_vector(expected, k=30)]
    assert found[-1].id == "15.jpg"  # subtracting a photo puts it last
    with_file = ix.find(["a dog", "+", f"img:{ix.root / '15.jpg'}"], k=1)
    assert with_file[0].id == "15.jpg"
    with pytest.raises(QueryError, match="file paths are not accepted"):
        ix.find(f"img:{ix.root / '15.jpg'}", allow_files=False)
    with pytest.raises(QueryError, match="no image 'nope.jpg' in this index"):
        ix.find("id:nope.jpg")


def test_feedback_moves_marked_photos_up_and_down(steer_index):
    ix = steer_index
    query = "a plate of food on a table"
    before = [r.id for r in ix.find(query, k=30)]
    good, bad = before[15], before[0]
    after = [r.id for r in ix.find(query, more_like=[good], less_like=[bad], k=30)]
    assert after.index(good) < 3 < after.index(bad)
    # Feedback alone (no query) ranks the photo marked good first.
    assert ix.find(None, more_like=[good], k=1)[0].id == good
    with pytest.raises(QueryError, match="no image 'nope.jpg'"):
        ix.find(query, more_like=["nope.jpg"])


def test_filters_apply_before_ranking_so_k_stays_k(steer_index):
    ix = steer_index
    in_trip = ix.find("a dog", filters=Filters.parse(folder="trip"), k=5)
    assert len(in_trip) == 5 and all(r.id.startswith("trip/") for r in in_trip)
    assert ix.find("a dog", filters=Filters.parse(folder=str(ix.root / "trip")), k=5) == in_trip
    canon = ix.find("a dog", filters=Filters.parse(camera="canon"), k=5)
    assert sorted(r.id for r in canon) == ["12.jpg", "trip/0.jpg", "trip/1.jpg"]
    # Dates: EXIF capture date where present, else the file date (2023 here).
    july = ix.find("a dog", filters=Filters.parse(after="2021-07", before="2021-08"), k=30)
    assert sorted(r.id for r in july) == ["12.jpg", "trip/0.jpg", "trip/1.jpg"]
    late = ix.find("a dog", filters=Filters.parse(after="2022"), k=30)
    assert len(late) == 25
    # Ranks are within the filtered photos, in the unfiltered order.
    ranking = [r.id for r in ix.find("a dog", k=30) if r.id.startswith("trip/")]
    assert [r.id for r in in_trip] == ranking[:5] and [r.rank for r in in_trip] == [1, 2, 3, 4, 5]
    with pytest.raises(FilterError, match="'last week' is not a date"):
        Filters.parse(after="last week")


def test_metadata_is_decoded_only_when_a_filter_asks(steer_index):
    """Opening an index and a plain search leave the photos' EXIF meta as stored (JSON text, a quarter
    of a cold search's manifest read); a filter decodes it and finds the same photos as ever."""
    ix = SearchIndex.open(steer_index.path)
    assert ix.find("a dog", k=5) == steer_index.find("a dog", k=5)
    assert "meta" not in vars(ix)
    canon = ix.find("a dog", filters=Filters.parse(camera="canon"), k=5)
    assert sorted(r.id for r in canon) == ["12.jpg", "trip/0.jpg", "trip/1.jpg"]
    assert ix.meta == steer_index.meta and ix.meta[ix.ids.index("12.jpg")]["camera"] == "Canon EOS 5D"


def test_offset_pages_continue_the_ranking(steer_index):
    ix = steer_index
    whole = ix.find("a dog", k=12)
    assert ix.find("a dog", k=6, offset=6) == whole[6:]
    trip = Filters.parse(folder="trip")
    assert ix.find("a dog", k=3, offset=3, filters=trip) == ix.find("a dog", k=6, filters=trip)[3:]


def test_pages_continue_the_ranking_through_duplicate_photos(tmp_path, zero_shot_dir):  # noqa: F811
    """Copies of one photo have equal similarities to every query: each page (`offset + k` results less
    the first `offset`) must still continue the one before it, with no copy shown twice and none lost,
    with and without a filter (argpartition ordered ties differently for each k)."""
    root = tmp_path / "photos"
    (root / "trip").mkdir(parents=True)
    originals = photos(24)
    for i, p in enumerate(originals):
        shutil.copy(p, (root / "trip" if i % 2 else root) / p.name)
    for i in range(4):  # a library with the same photo saved again, here and there
        shutil.copy(originals[5], (root / "trip" if i % 2 else root) / f"copy-{i}.jpg")
    ix, _ = update_index(root, tmp_path / "ix", zero_shot_dir, progress=False)
    assert np.array_equal(ix.vector(f"trip/{originals[5].name}"), ix.vector("copy-0.jpg"))
    trip = Filters.parse(folder="trip")
    for query, filters in (("id:" + ix.ids[0], None), ("a dog", None), ("a dog", trip)):
        whole = [r.id for r in ix.find(query, filters=filters, k=len(ix))]
        for size in (1, 2, 3, 5):
            pages = [ix.find(query, filters=filters, k=size, offset=at) for at in range(0, len(whole), size)]
            assert [r.id for page in pages for r in page] == whole, (query, size)


def test_an_index_without_metadata_says_so_and_a_rerun_records_it(steer_index, tmp_path, zero_shot_dir):  # noqa: F811
    ix_dir = tmp_path / "ix"
    shutil.copytree(steer_index.path, ix_dir)

    def without_meta(manifest: dict) -> None:
        for entry in manifest["entries"]:
            del entry["meta"]  # as an index written before filters existed

    write_legacy_manifest(ix_dir, without_meta)
    old = SearchIndex.open(ix_dir)
    assert old.find("a dog", filters=Filters.parse(folder="trip"), k=3)  # the folder needs no metadata
    with pytest.raises(FilterError, match="built before cameras were recorded; rerun `cbir index`"):
        old.find("a dog", filters=Filters.parse(camera="canon"))
    _, report = update_index(steer_index.root, ix_dir, zero_shot_dir, progress=False)
    assert report.unchanged == 30 and not report.added
    assert len(SearchIndex.open(ix_dir).find("a dog", filters=Filters.parse(camera="nikon"))) == 2


# ---- the CLI -------------------------------------------------------------------------------------
def cli(*args: str):
    return runner.invoke(app, ["search", *args])


def test_cli_arithmetic_feedback_filters_paging_paths(steer_index):
    ix = str(steer_index.path)
    result = cli("a dog", "+", "snow:0.5", "-", "people", "--index", ix, "-k", "3", "--json")
    assert result.exit_code == 0, result.output
    expected = steer_index.find("a dog + snow:0.5 - people", k=3)
    assert [r["id"] for r in json.loads(result.stdout)] == [r.id for r in expected]

    paths = cli("a dog", "--index", ix, "-k", "4", "--offset", "2", "--paths", "--folder", "trip")
    assert paths.exit_code == 0, paths.output
    wanted = steer_index.find("a dog", k=4, offset=2, filters=Filters.parse(folder="trip"))
    assert paths.stdout.splitlines() == [str(r.path) for r in wanted]

    top = steer_index.find("a dog", k=30)
    good = top[20].id
    marked = cli("a dog", "--index", ix, "-k", "3", "--more-like", good, "--less-like", top[0].id, "--paths")
    assert str(steer_index.root / good) in marked.stdout.splitlines()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["a dog", "+", "+", "beach"], "an operator with nothing after it"),
        (["a dog", "--after", "yesterday"], "--after: 'yesterday' is not a date"),
        (["a dog", "--more-like", "nope.jpg"], "no image 'nope.jpg' in this index"),
        (["a dog", "--offset", "-1"], "must not be negative"),
    ],
)
def test_cli_bad_steering_is_a_one_line_error(steer_index, args, message):
    result = cli(*args, "--index", str(steer_index.path))
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_cli_open_without_a_viewer_says_so(steer_index, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    result = cli("a dog", "--index", str(steer_index.path), "-k", "1", "--open")
    assert result.exit_code == 2 and "no system image viewer found" in result.output
    assert str(steer_index.root) in result.output  # it still names the top result


def test_cli_open_hands_the_top_result_to_the_viewer(steer_index, monkeypatch, tmp_path):
    log = tmp_path / "opened"
    viewer = tmp_path / "bin" / "xdg-open"
    viewer.parent.mkdir()
    viewer.write_text(f'#!/bin/sh\necho "$1" > {log}\n')
    viewer.chmod(0o755)
    monkeypatch.setenv("PATH", str(viewer.parent))
    result = cli("a dog", "--index", str(steer_index.path), "-k", "1", "--open")
    assert result.exit_code == 0, result.output
    top = steer_index.find("a dog", k=1)[0].path
    for _ in range(100):
        if log.exists() and log.read_text().strip():
            break
        __import__("time").sleep(0.05)
    assert log.read_text().strip() == str(top)


def test_mixed_text_and_image_query_keeps_the_old_combined_vector(steer_index):
    ix = steer_index
    image = ix.root / "16.jpg"
    combined = unit(ix.embed_text("a dog")) + unit(ix.embed_image(image))
    assert [r.id for r in ix.find("a dog", image=image, k=10)] == [
        r.id for r in ix.search_vector(combined, k=10)
    ]
    assert np.allclose(
        [r.score for r in ix.search("a dog", image, k=5)],
        [r.score for r in ix.find("a dog", image=image, k=5)],
    )
