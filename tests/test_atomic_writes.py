"""Writers that must never leave a half-written file where a reader looks (crash mid-write)."""

import json
from pathlib import Path

import pytest

from cbir.index import _write_json_atomic


def test_index_manifest_writer_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    """The write dies halfway (disk full, kill): readers still see the complete previous manifest."""
    manifest = tmp_path / "index.json"
    _write_json_atomic(manifest, {"format": 1, "images": ["a.jpg"]})
    real_write_text = Path.write_text

    def dies_halfway(self, data, *args, **kwargs):
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", dies_halfway)
    with pytest.raises(OSError, match="No space left"):
        _write_json_atomic(manifest, {"format": 1, "images": ["a.jpg", "b.jpg"]})
    monkeypatch.undo()
    assert json.loads(manifest.read_text()) == {"format": 1, "images": ["a.jpg"]}
    _write_json_atomic(manifest, {"format": 1, "images": []})
    assert json.loads(manifest.read_text()) == {"format": 1, "images": []}
