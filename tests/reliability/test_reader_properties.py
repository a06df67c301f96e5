"""Property-based tests of the dataset readers (hypothesis): any input, garbled or not, is read into a
`Dataset` or refused with a `DatasetError` naming the file (and the line or entry), never an unhandled
exception; what a standard writer of each format writes reads back as written."""

from __future__ import annotations

import csv
import io
import json
import uuid
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from cbir.datasets import Dataset, DatasetError, load_dataset
from tests.conftest import KAGGLE_MINI
from tests.reliability.conftest import SEEDED

PHOTOS = [KAGGLE_MINI / "images_train" / f"{i}.jpg" for i in range(3)]
NAMES = [p.name for p in PHOTOS]
ODD_NAMES = ["missing.jpg", "", ".", "..", "../images"]  # none of them a photo

# Text as it comes: any characters (NUL, quotes, separators, lone line breaks), or raw bytes.
garbled_text = st.text(st.characters(codec="utf-8"), max_size=200)
line_text = st.text(
    st.characters(codec="utf-8", exclude_characters="\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\ufeff")
)
caption = line_text.map(str.strip).filter(bool)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | garbled_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(garbled_text, inner, max_size=4),
    max_leaves=12,
)


def dataset_folder(base: Path, files: dict[str, bytes | str], images_dir: str = "images") -> Path:
    """A fresh folder holding `files` (relative name -> content) and the real photos in `images_dir`."""
    root = base / uuid.uuid4().hex
    (root / images_dir).mkdir(parents=True)
    for photo in PHOTOS:
        (root / images_dir / photo.name).symlink_to(photo)
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_bytes(content)
    return root


def read_or_refuse(root: Path) -> Dataset | DatasetError:
    """The dataset, or the error; a refusal must name a file of the dataset (or the folder), and a
    dataset never takes a folder for a photo."""
    try:
        data = load_dataset(root)
        assert all(p.is_file() for p in data.images), data.images
        return data
    except DatasetError as e:
        assert e.path is not None and Path(e.path).resolve().is_relative_to(root.resolve()), e
        assert str(e).startswith(f"{e.path}:"), e
        return e


def pairs_of(data: Dataset) -> list[tuple[str, str]]:
    return [(data.images[i].name, text) for text, i in zip(data.captions, data.caption_image, strict=True)]


# ---- captions.txt / captions.csv ----
@given(content=garbled_text | st.binary(max_size=200))
@SEEDED
def test_any_captions_file_is_read_or_refused_by_line(tmp_path, content):
    result = read_or_refuse(dataset_folder(tmp_path, {"captions.txt": content}))
    if isinstance(result, DatasetError) and "quote" in str(result):
        assert result.line is not None


@given(rows=st.lists(st.tuples(st.sampled_from(NAMES + ODD_NAMES), garbled_text), max_size=8))
@SEEDED
def test_captions_rows_of_any_shape_are_read_or_refused(tmp_path, rows):
    buf = io.StringIO()
    csv.writer(buf).writerows([["image", "caption"], *rows])
    read_or_refuse(dataset_folder(tmp_path, {"captions.txt": buf.getvalue()}))


@given(rows=st.lists(st.tuples(st.sampled_from(NAMES), caption), min_size=1, max_size=8))
@SEEDED
def test_captions_written_by_csv_writer_read_back(tmp_path, rows):
    buf = io.StringIO()
    csv.writer(buf).writerows([["image", "caption"], *rows])
    data = load_dataset(dataset_folder(tmp_path, {"captions.txt": buf.getvalue()}))
    assert data.format == "csv" and pairs_of(data) == rows


# ---- Karpathy JSON ----
karpathy_entry = st.fixed_dictionaries(
    {},
    optional={
        "filename": st.sampled_from(NAMES + ODD_NAMES) | json_value,
        "filepath": st.just("") | json_value,
        "split": st.sampled_from(["train", "val", "test", "restval", "tset"]) | json_value,
        "sentences": st.lists(st.fixed_dictionaries({}, optional={"raw": caption | json_value}) | json_value)
        | json_value,
        "tags": json_value,
    },
)


@given(
    doc=st.fixed_dictionaries({}, optional={"images": st.lists(karpathy_entry | json_value, max_size=5)})
    | json_value
)
@example(doc={"images": [{"filename": "."}]})  # the folder itself is no photo
@example(doc={"images": [{"filename": None}]})  # a null name is no name (found by a full run)
@SEEDED
def test_any_karpathy_json_is_read_or_refused_by_entry(tmp_path, doc):
    read_or_refuse(dataset_folder(tmp_path, {"dataset_x.json": json.dumps(doc)}))


@given(content=garbled_text | st.binary(max_size=200))
@SEEDED
def test_garbled_karpathy_file_is_refused_by_line(tmp_path, content):
    read_or_refuse(dataset_folder(tmp_path, {"dataset_x.json": content}))


@given(
    images=st.lists(
        st.tuples(
            st.sampled_from(NAMES), st.sampled_from(["train", "val", "test"]), st.lists(caption, max_size=4)
        ),
        min_size=1,
        max_size=3,
        unique_by=lambda t: t[0],
    )
)
@SEEDED
def test_karpathy_json_reads_back(tmp_path, images):
    doc = {
        "images": [
            {"filename": n, "split": s, "sentences": [{"raw": c} for c in caps]} for n, s, caps in images
        ]
    }
    data = load_dataset(dataset_folder(tmp_path, {"dataset_x.json": json.dumps(doc)}))
    assert [p.name for p in data.images] == [n for n, _, _ in images]
    assert data.splits == [s for _, s, _ in images]
    assert pairs_of(data) == [(n, c) for n, _, caps in images for c in caps]


# ---- COCO captions JSON ----
coco_image = st.fixed_dictionaries(
    {},
    optional={
        "id": st.integers(0, 3) | json_value,
        "file_name": st.sampled_from(NAMES + ODD_NAMES) | json_value,
    },
)
coco_annotation = st.fixed_dictionaries(
    {}, optional={"image_id": st.integers(0, 3) | json_value, "caption": caption | json_value}
)


@given(
    doc=st.fixed_dictionaries(
        {},
        optional={
            "images": st.lists(coco_image | json_value, max_size=4) | json_value,
            "annotations": st.lists(coco_annotation | json_value, max_size=4) | json_value,
        },
    )
    | json_value
)
@SEEDED
def test_any_coco_json_is_read_or_refused_by_entry(tmp_path, doc):
    read_or_refuse(dataset_folder(tmp_path, {"annotations/captions_train2017.json": json.dumps(doc)}))


@given(captions=st.lists(st.tuples(st.sampled_from(range(len(NAMES))), caption), max_size=8))
@SEEDED
def test_coco_json_reads_back(tmp_path, captions):
    doc = {
        "images": [{"id": 10 + i, "file_name": n} for i, n in enumerate(NAMES)],
        "annotations": [{"image_id": 10 + i, "caption": c} for i, c in captions],
    }
    root = dataset_folder(tmp_path, {"annotations/captions_train2017.json": json.dumps(doc)}, "train2017")
    data = load_dataset(root)
    assert data.format == "coco" and [p.name for p in data.images] == NAMES
    assert pairs_of(data) == [(NAMES[i], c) for i, c in captions]


# ---- Kaggle layout ----
@given(
    description=garbled_text | st.binary(max_size=200),
    tags=garbled_text | st.binary(max_size=100),
    answers=garbled_text | st.binary(max_size=100),
    features=garbled_text,
)
@SEEDED
def test_any_kaggle_text_file_is_read_or_refused_by_line(tmp_path, description, tags, answers, features):
    files = {
        "descriptions_train/0.txt": description,
        "tags_train/1.txt": tags,
        "descriptions_test/0.txt": description,
        "answers_test.csv": answers,
        "features_train/features_resnet1000_train.csv": features,
    }
    read_or_refuse(dataset_folder(tmp_path, files, "images_train"))


@given(name=st.text(st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=8))
@example(name="\u00b2")  # a digit to str.isdigit, not to int()
@SEEDED
def test_kaggle_files_of_any_name_are_read_or_refused(tmp_path, name):
    if name in (".", ".."):
        return
    files = {f"descriptions_train/{name}.txt": "a photo", f"images_test/{name}.jpg": PHOTOS[0].read_bytes()}
    read_or_refuse(dataset_folder(tmp_path, files, "images_train"))


@given(descriptions=st.lists(st.lists(caption, min_size=1, max_size=5), min_size=1, max_size=3))
@SEEDED
def test_kaggle_descriptions_read_back(tmp_path, descriptions):
    files = {f"descriptions_train/{i}.txt": "\n".join(lines) + "\n" for i, lines in enumerate(descriptions)}
    data = load_dataset(dataset_folder(tmp_path, files, "images_train"))
    assert data.format == "kaggle"
    assert pairs_of(data) == [(NAMES[i], c) for i, lines in enumerate(descriptions) for c in lines]


@pytest.mark.parametrize("name", ["captions.txt", "dataset_x.json", "annotations/captions_val2014.json"])
def test_file_that_is_a_folder_is_refused_by_name(tmp_path, name):
    root = dataset_folder(tmp_path, {})
    (root / name).mkdir(parents=True)
    read_or_refuse(root)
