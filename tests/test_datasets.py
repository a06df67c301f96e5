"""Every reader on real data (slices of ../shared/datasets), and bad input with file and line."""

import json
import shutil

import numpy as np
import pytest

from cbir.datasets import DatasetError, detect_format, load_dataset
from cbir.datasets.kaggle import FEATURE_FILES
from tests.conftest import KAGGLE_MINI, RSICD


def test_rsicd_official_split(rsicd):
    assert rsicd.format == "karpathy"
    assert len(rsicd) == 10921
    assert {s: rsicd.splits.count(s) for s in ("train", "val", "test")} == {
        "train": 8734,
        "val": 1094,
        "test": 1093,
    }
    test = rsicd.split("test")
    assert len(test.captions) == 4214
    assert test.caption_image.max() == len(test) - 1
    assert rsicd.augmented is not None and rsicd.augmented.any()
    assert sum(1 for t in rsicd.tags if not t) == 921


def test_sample_is_spread_and_consistent(rsicd):
    part = rsicd.sample(10)
    assert {s: part.splits.count(s) for s in ("train", "val", "test")} == {"train": 10, "val": 10, "test": 10}
    for i in range(len(part)):
        full = rsicd.images.index(part.images[i])
        assert part.captions_of(i) == rsicd.captions_of(full)


def test_kaggle_layout_pairs_test_descriptions_by_answers_not_by_number(kaggle_mini):
    assert kaggle_mini.format == "kaggle"
    test = kaggle_mini.split("test")
    assert len(test) == 79 and len(test.captions) == 79
    answers = dict(line.split(",") for line in (KAGGLE_MINI / "answers_test.csv").read_text().split()[1:])
    for j, cid in enumerate(test.caption_ids):
        assert test.images[test.caption_image[j]].name == answers[cid]
    assert (
        sum(
            test.images[test.caption_image[j]].stem == cid.split(".")[0]
            for j, cid in enumerate(test.caption_ids)
        )
        < 10
    )
    train = kaggle_mini.split("train")
    assert len(train) == 80 and len(train.captions) == 400
    assert any(t.startswith("animal:") for tags in train.tags for t in tags)


def copy_kaggle(tmp_path, with_answers=True):
    dst = tmp_path / "kaggle"
    shutil.copytree(KAGGLE_MINI, dst)
    if not with_answers:
        (dst / "answers_test.csv").unlink()
    return dst


def write_feature_csvs(root, data, rng):
    """Kaggle-style feature CSVs (no header, image name first, rows shuffled) from given features."""
    written = {}
    for split in ("train", "test"):
        part = data.split(split)
        (root / f"features_{split}").mkdir(exist_ok=True)
        for name, (stem, width) in FEATURE_FILES.items():
            feats = rng.normal(size=(len(part), width)).astype(np.float32)
            rows = [
                f"images_{split}/{p.name}," + ",".join(f"{v:.6f}" for v in feats[i])
                for i, p in enumerate(part.images)
            ]
            order = rng.permutation(len(rows))
            (root / f"features_{split}" / f"{stem}_{split}.csv").write_text(
                "\n".join(rows[k] for k in order) + "\n"
            )
            written[(split, name)] = feats
    return written


def test_kaggle_feature_csvs_are_placed_by_image_name(tmp_path, kaggle_mini):
    root = copy_kaggle(tmp_path)
    written = write_feature_csvs(root, kaggle_mini, np.random.default_rng(0))
    data = load_dataset(root)
    for split in ("train", "test"):
        part = data.split(split)
        for name in FEATURE_FILES:
            np.testing.assert_allclose(part.features[name], written[(split, name)], atol=1e-5)


def test_kaggle_feature_csv_wrong_width_names_file_and_line(tmp_path, kaggle_mini):
    root = copy_kaggle(tmp_path)
    write_feature_csvs(root, kaggle_mini, np.random.default_rng(1))
    f = root / "features_train" / "features_resnet1000_train.csv"
    lines = f.read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0]
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"features_resnet1000_train.csv:3: expected 1000 feature values"):
        load_dataset(root)


def test_kaggle_without_answers_leaves_test_unpaired(tmp_path):
    data = load_dataset(copy_kaggle(tmp_path, with_answers=False))
    test = data.split("test")
    assert len(test.captions) == 79 and (test.caption_image == -1).all()


def test_empty_description_is_skipped_and_reported(tmp_path):
    root = copy_kaggle(tmp_path)
    (root / "descriptions_train" / "3.txt").write_text("\n\n")
    data = load_dataset(root)
    assert len(data.split("train").captions) == 395
    assert any("3.txt" in s and "empty" in s for s in data.report.skipped)


def test_non_utf8_text_names_file_and_line(tmp_path):
    root = copy_kaggle(tmp_path)
    (root / "descriptions_train" / "5.txt").write_bytes(b"a fine caption\nbad \xff byte\n")
    with pytest.raises(DatasetError, match=r"5.txt:2: not UTF-8"):
        load_dataset(root)


def test_karpathy_missing_image_is_skipped_and_counted(tmp_path, rsicd_slice_dir):
    doc = json.loads(next(rsicd_slice_dir.glob("dataset_*.json")).read_text())
    doc["images"][0]["filename"] = "no-such-file.jpg"
    (tmp_path / "dataset_x.json").write_text(json.dumps(doc))
    data = load_dataset(tmp_path)
    assert len(data) == len(doc["images"]) - 1
    assert len(data.report) == 1 and "no-such-file.jpg" in data.report.skipped[0]


def test_karpathy_malformed_json_names_line(tmp_path):
    (tmp_path / "dataset_bad.json").write_text('{"images": [\n{"filename": "a.jpg",\n}\n')
    with pytest.raises(DatasetError, match=r"dataset_bad.json:3: malformed JSON"):
        load_dataset(tmp_path)


def rsicd_files(rsicd, n):
    part = rsicd.sample(n)
    return part, [(p, part.captions_of(i)) for i, p in enumerate(part.images)]


def test_coco_captions_json(tmp_path, rsicd):
    part, items = rsicd_files(rsicd, 5)
    (tmp_path / "val2017").mkdir()
    images, anns = [], []
    for i, (path, caps) in enumerate(items):
        shutil.copy(path, tmp_path / "val2017" / path.name)
        images.append({"id": 100 + i, "file_name": path.name})
        anns += [{"id": len(anns), "image_id": 100 + i, "caption": c} for c in caps]
    anns.append({"id": 999, "image_id": 12345, "caption": "orphan"})
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_val2017.json").write_text(
        json.dumps({"images": images, "annotations": anns})
    )
    assert detect_format(tmp_path) == "coco"
    data = load_dataset(tmp_path)
    assert len(data) == len(items) and set(data.splits) == {"val"}
    assert len(data.captions) == sum(len(c) for _, c in items)
    assert data.captions_of(2) == items[2][1]
    assert len(data.report) == 1 and "unknown or missing image" in data.report.skipped[0]


def test_csv_captions_and_malformed_row(tmp_path, rsicd):
    part, items = rsicd_files(rsicd, 6)
    (tmp_path / "Images").mkdir()
    lines = ["image,caption"]
    for path, caps in items:
        shutil.copy(path, tmp_path / "Images" / path.name)
        lines += [f'{path.name},"{c}"' for c in caps]
    (tmp_path / "captions.txt").write_text("\n".join(lines) + "\n")
    data = load_dataset(tmp_path)
    assert data.format == "csv" and len(data) == 18
    assert data.captions_of(0) == items[0][1]
    assert set(data.splits) <= {"train", "val", "test"}
    (tmp_path / "captions.txt").write_text("\n".join(lines[:4] + ["just-one-column"] + lines[4:]) + "\n")
    with pytest.raises(DatasetError, match=r"captions.txt:5: expected 'image,caption'"):
        load_dataset(tmp_path)


def test_plain_folder_recursive(tmp_path, rsicd):
    part, items = rsicd_files(rsicd, 2)
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    shutil.copy(items[0][0], tmp_path / "a" / "one.jpg")
    shutil.copy(items[1][0], tmp_path / "a" / "b" / "two.JPG")
    shutil.copy(items[2][0], tmp_path / ".hidden" / "three.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    data = load_dataset(tmp_path)
    assert data.format == "folder"
    assert data.image_ids == ["a/b/two.JPG", "a/one.jpg"]
    assert data.captions == []


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no images"):
        load_dataset(tmp_path)


def test_rsicd_is_detected(tmp_path):
    assert detect_format(RSICD) == "karpathy"
    assert detect_format(KAGGLE_MINI) == "kaggle"
