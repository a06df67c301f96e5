"""The server sends only what it indexed, answers only its own host names, and tells browsers to
neither sniff nor frame what it sends."""

from __future__ import annotations

import os
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from cbir.cli import host_names
from cbir.index import update_index
from cbir.server import create_app


@pytest.fixture
def served(folder, tmp_path, zero_shot_dir):
    index, _ = update_index(folder, tmp_path / "ix", zero_shot_dir, progress=False)
    with TestClient(
        create_app(index, allowed_hosts=host_names("127.0.0.1")), base_url="http://localhost"
    ) as c:
        yield c, folder


def test_replaced_or_deleted_photo_is_not_served(served, tmp_path):
    client, folder = served
    assert client.get("/images/4.jpg").status_code == 200
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    (folder / "4.jpg").unlink()
    os.symlink(secret, folder / "4.jpg")
    for url in ("/images/4.jpg", "/thumbs/4.jpg"):
        response = client.get(url)
        assert response.status_code == 404 and "root:x" not in response.text
    (folder / "5.jpg").unlink()
    assert client.get("/images/5.jpg").status_code == 404
    assert client.get("/thumbs/5.jpg").status_code == 404


def test_only_the_bound_host_names_are_answered(served):
    client, _ = served
    assert client.get("/api/health").status_code == 200
    assert client.get("/api/health", headers={"Host": "127.0.0.1:8000"}).status_code == 200
    rebinding = client.get("/api/search?q=dog", headers={"Host": "attacker.example:8000"})
    assert rebinding.status_code == 400
    assert host_names("0.0.0.0") == ["*"] and host_names("192.168.1.5") == ["192.168.1.5"]


def test_security_headers(served):
    client, _ = served
    for url in ("/", "/api/health", "/images/4.jpg", "/static/app.js"):
        headers = client.get(url).headers
        assert headers["x-content-type-options"] == "nosniff", url
        assert headers["x-frame-options"] == "DENY", url
        assert "frame-ancestors 'none'" in headers["content-security-policy"], url
    assert "script-src 'self'" in client.get("/").headers["content-security-policy"]
    assert client.get("/docs").status_code == 200  # Swagger UI still loads (no page CSP there)


def test_file_name_that_is_not_utf8_round_trips_over_http(folder, tmp_path, zero_shot_dir):
    """A search that returns it answers 200, its JSON name shows the bytes as \\xNN, and that name,
    URL-encoded as the page does, finds the photo again (similar search, full image, thumbnail)."""
    raw = b"caf\xe9-\xff.jpg"  # Latin-1 bytes: not valid UTF-8
    (folder / "4.jpg").rename(folder / os.fsdecode(raw))
    index, _ = update_index(folder, tmp_path / "ix", zero_shot_dir, progress=False)
    with TestClient(create_app(index)) as client:
        response = client.get("/api/search", params={"q": "a photo", "k": len(index)})
        assert response.status_code == 200
        (hit,) = [h for h in response.json()["results"] if "caf" in h["id"]]
        assert hit["id"] == "caf\\xe9-\\xff.jpg"
        assert client.get(hit["image"]).content == (folder / os.fsdecode(raw)).read_bytes()
        assert client.get(hit["thumb"]).headers["content-type"] == "image/jpeg"
        similar = client.get(f"/api/similar/{quote(hit['id'], safe='')}", params={"k": 1})
        assert similar.status_code == 200 and similar.json()["results"][0]["id"] == hit["id"]
        assert client.get("/api/similar/caf%E9-%FF.jpg").status_code == 404  # not a name the API gave
