"""`cbir serve`: the HTTP API (every endpoint, good and bad input) and the page, driven in headless Chromium.

The index is real: the 80 COCO photos of cs5785-mini/images_train, indexed with the shipped default model.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import KAGGLE_MINI, REPO

IMAGES = KAGGLE_MINI / "images_train"
CHROMIUM = Path(os.environ.get("CBIR_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOT = REPO / "docs" / "web.png"


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    from cbir.index import build_index

    return build_index(IMAGES, tmp_path_factory.mktemp("web") / "index", progress=False)


@pytest.fixture(scope="module")
def client(index):
    from fastapi.testclient import TestClient

    from cbir.server import create_app

    with TestClient(create_app(index)) as c:
        yield c


def ids_of(page: dict) -> list[str]:
    return [hit["id"] for hit in page["results"]]


def jpeg_bytes(image_id: str) -> bytes:
    return (IMAGES / image_id).read_bytes()


# ---- the API ---------------------------------------------------------------------------------------


def test_health_counts_the_indexed_images(client, index):
    assert len(index) == 80
    assert client.get("/api/health").json() == {
        "status": "ok", "images": 80, "loading": False, "calibrated": True, "detail": None,
    }  # fmt: skip


def test_text_search_returns_the_index_ranking_with_links(client, index):
    page = client.get("/api/search", params={"q": "a plate of food on a table", "k": 5}).json()
    expected = index.search_text("a plate of food on a table", k=5)
    assert ids_of(page) == [r.id for r in expected]
    assert [h["rank"] for h in page["results"]] == [1, 2, 3, 4, 5]
    assert [h["score"] for h in page["results"]] == pytest.approx([r.score for r in expected], abs=1e-6)
    assert page["more"] is True and page["query"] == {"text": "a plate of food on a table"}
    first = page["results"][0]
    assert client.get(first["image"]).content == jpeg_bytes(first["id"])
    assert client.get(first["thumb"]).headers["content-type"] == "image/jpeg"


def test_pages_continue_the_ranking_and_end(client, index):
    everything = [r.id for r in index.search_text("a dog", k=len(index))]
    pages, offset = [], 0
    while True:
        page = client.get("/api/search", params={"q": "a dog", "k": 30, "offset": offset}).json()
        pages.append(page)
        offset += 30
        if not page["more"]:
            break
    assert [len(p["results"]) for p in pages] == [30, 30, 20]
    assert sum((ids_of(p) for p in pages), []) == everything
    assert pages[-1]["results"][-1]["rank"] == 80
    beyond = client.get("/api/search", params={"q": "a dog", "offset": 500}).json()
    assert beyond["results"] == [] and beyond["more"] is False


def test_similar_ranks_the_image_itself_first(client, index):
    page = client.get("/api/similar/7.jpg", params={"k": 4}).json()
    assert ids_of(page) == [r.id for r in index.search_similar("7.jpg", k=4)]
    assert ids_of(page)[0] == "7.jpg"


def test_upload_of_an_indexed_photo_finds_that_photo(client):
    page = client.post(
        "/api/search/image", files={"file": ("mine.jpg", jpeg_bytes("12.jpg"), "image/jpeg")}, params={"k": 3}
    )
    assert page.status_code == 200
    assert ids_of(page.json())[0] == "12.jpg"
    # Any accepted format works: the same photo as PNG.
    png = io.BytesIO()
    Image.open(IMAGES / "12.jpg").save(png, "PNG")
    page = client.post("/api/search/image", files={"file": ("mine.png", png.getvalue(), "image/png")})
    assert ids_of(page.json())[0] == "12.jpg"


def test_thumbnails_are_small_jpegs_of_the_image(client):
    response = client.get("/thumbs/3.jpg")
    thumb = Image.open(io.BytesIO(response.content))
    original = Image.open(IMAGES / "3.jpg")
    assert thumb.format == "JPEG" and max(thumb.size) <= 320
    assert thumb.size[0] / thumb.size[1] == pytest.approx(original.size[0] / original.size[1], rel=0.02)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"q": "x" * 301}, "at most 300 characters"),
        ({"q": "   "}, "blank"),
        ({}, "q: Field required"),
        ({"q": "a dog", "k": 0}, "k: Input should be greater than or equal to 1"),
        ({"q": "a dog", "k": 101}, "k: Input should be less than or equal to 100"),
        ({"q": "a dog", "offset": -1}, "offset"),
        ({"q": "a dog", "k": "many"}, "k: Input should be a valid integer"),
    ],
)
def test_bad_search_parameters_are_422_with_a_reason(client, params, message):
    response = client.get("/api/search", params=params)
    assert response.status_code == 422
    assert message in response.json()["detail"]


def test_unknown_image_ids_are_404(client):
    for url in ("/api/similar/nope.jpg", "/images/nope.jpg", "/thumbs/nope.jpg"):
        response = client.get(url)
        assert response.status_code == 404, url
        assert "no image 'nope.jpg'" in response.json()["detail"]


@pytest.mark.parametrize("kind", ["images", "thumbs", "api/similar"])
@pytest.mark.parametrize(
    "attempt",
    [
        "../../pyproject.toml",
        "..%2F..%2Fpyproject.toml",
        "%2e%2e/%2e%2e/pyproject.toml",
        f"{REPO / 'pyproject.toml'}",
        f"%2F{str(REPO / 'pyproject.toml').lstrip('/')}",
        "/etc/passwd",
        "..%5C..%5Cpyproject.toml",
    ],
)
def test_paths_outside_the_index_are_404(client, kind, attempt):
    response = client.get(f"/{kind}/{attempt}")
    assert response.status_code == 404
    assert b"[build-system]" not in response.content and b"root:" not in response.content


def test_static_files_do_not_leak_the_source(client):
    assert client.get("/static/app.js").status_code == 200
    for attempt in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2Fapp.py"):
        assert client.get(attempt).status_code == 404, attempt


def test_bad_uploads_are_refused_with_a_reason(client):
    def upload(name: str, data: bytes, content_type: str):
        return client.post("/api/search/image", files={"file": (name, data, content_type)})

    tiff = io.BytesIO()
    Image.new("RGB", (32, 32)).save(tiff, "TIFF")
    vast = io.BytesIO()
    Image.new("1", (8000, 6000)).save(vast, "PNG")  # 48 megapixels in a few KB
    cases = [
        (upload("notes.txt", b"hello", "text/plain"), 415, "unsupported upload type 'text/plain'"),
        (upload("fake.jpg", b"hello, not a photo", "image/jpeg"), 415, "not an image that can be read"),
        (upload("photo.jpg", tiff.getvalue(), "image/jpeg"), 415, "is TIFF"),
        (upload("empty.jpg", b"", "image/jpeg"), 422, "empty"),
        (upload("vast.png", vast.getvalue(), "image/png"), 413, "too many pixels (8000x6000)"),
        (upload("cut.jpg", jpeg_bytes("5.jpg")[:200], "image/jpeg"), 415, "not an image that can be read"),
        (upload("half.jpg", jpeg_bytes("5.jpg")[:5000], "image/jpeg"), 415, "not an image that can be read"),
        (client.post("/api/search/image"), 422, "file: Field required"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, response.text
        assert message in response.json()["detail"]


def test_uploads_over_the_size_limit_are_413(index):
    from fastapi.testclient import TestClient

    from cbir.server import create_app

    small = TestClient(create_app(index, max_upload_bytes=4000))
    photo = jpeg_bytes("0.jpg")  # 13 KB
    response = small.post("/api/search/image", files={"file": ("big.jpg", photo, "image/jpeg")})
    assert response.status_code == 413
    # Just over the file limit but within the body allowance: refused after reading 4001 bytes.
    response = small.post("/api/search/image", files={"file": ("big.jpg", photo[:4100], "image/jpeg")})
    assert response.status_code == 413 and "too large" in response.json()["detail"]
    ten_mb = TestClient(create_app(index)).post(
        "/api/search/image", files={"file": ("huge.jpg", b"\xff" * (11 * 2**20), "image/jpeg")}
    )
    assert ten_mb.status_code == 413


def test_openapi_describes_every_endpoint(client):
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == {
        "/api/health",
        "/api/search",
        "/api/similar/{image_id}",
        "/api/search/image",
        "/images/{image_id}",
        "/thumbs/{image_id}",
    }
    assert client.get("/docs").status_code == 200


def test_the_page_is_served(client):
    html = client.get("/").text
    assert 'id="search-form"' in html and "/static/app.js" in html
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")


def test_serve_refuses_a_folder_that_is_not_an_index(tmp_path):
    from cbir.cli import app

    result = CliRunner().invoke(app, ["serve", "--index", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output


# ---- the page in a real browser ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(index) -> Iterator[str]:
    """The real app served by uvicorn on a free loopback port, in a thread, for the browser."""
    import uvicorn

    from cbir.server import create_app

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(index), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def browser_page():
    """A Chromium page (Debian's /usr/bin/chromium driven by Playwright, fresh profile)."""
    if not CHROMIUM.exists():
        pytest.skip(
            f"BROWSER TEST SKIPPED: {CHROMIUM} is missing and could not be installed "
            "(`make test` runs `apt-get install chromium` when it can)"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="BROWSER TEST SKIPPED: playwright missing")
    profile = tempfile.mkdtemp(prefix="cbir-chromium-")
    try:
        with sync_api.sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile,
                executable_path=str(CHROMIUM),
                headless=True,
                viewport={"width": 1100, "height": 760},
                args=[
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                ],
            )
            context.set_default_timeout(20_000)
            yield context.new_page()
            context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def save_screenshot(png: bytes, out: Path) -> None:
    """The README's picture of the page: palette PNG, so it stays small in git."""
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.open(io.BytesIO(png)).convert("RGB").quantize(128).save(out, optimize=True)


def test_page_search_grid_click_and_errors_in_chromium(browser_page, server_url, index, tmp_path):
    from playwright.sync_api import expect

    page = browser_page
    page.goto(server_url)
    expect(page.locator("#index-info")).to_have_text("80 photos indexed")

    # Type a query: the grid shows the first page in the index's order, best first, with scores.
    query = "a plate of food on a table"
    page.fill("#query", query)
    page.press("#query", "Enter")
    hits = page.locator("#results .hit")
    expect(hits).to_have_count(24)
    expect(page.locator("#status")).to_have_text(f"24 results for “{query}”, best first.")
    expected = [r.id for r in index.search_text(query, k=48)]
    assert hits.locator(".caption a").all_inner_texts() == expected[:24]
    assert hits.first.locator(".caption").inner_text().startswith("#1 · ")
    assert f"q={query.replace(' ', '+')}" in page.url or "q=a%20plate" in page.url
    wait_for_thumbnails(page)
    shot = page.screenshot()
    save_screenshot(shot, SCREENSHOT if os.environ.get("CBIR_WRITE_SCREENSHOT") else tmp_path / "web.png")

    # "More results" appends the next page.
    page.click("#more")
    expect(hits).to_have_count(48)
    assert hits.locator(".caption a").all_inner_texts() == expected

    # Click a photo: the page searches by that image, which ranks itself first.
    clicked = expected[2]
    hits.nth(2).locator("button.photo").click()
    expect(page.locator("#status")).to_have_text(f"24 results for photos like {clicked}, best first.")
    expect(page.locator("#query-image")).to_be_visible()
    similar = [r.id for r in index.search_similar(clicked, k=24)]
    assert hits.locator(".caption a").all_inner_texts() == similar
    assert similar[0] == clicked and f"similar={clicked}" in page.url

    # Back returns to the text results.
    page.go_back()
    expect(page.locator("#status")).to_have_text(f"24 results for “{query}”, best first.")
    expect(page.locator("#query-image")).to_be_hidden()

    # Upload a photo.
    page.set_input_files("#upload", str(IMAGES / "12.jpg"))
    expect(page.locator("#status")).to_have_text("24 results for photos like your upload 12.jpg, best first.")
    expect(hits.first.locator(".caption a")).to_have_text("12.jpg")

    # Error and empty states say what happened.
    page.fill("#query", "   ")
    page.press("#query", "Enter")
    expect(page.locator("#status.error")).to_contain_text("Type a few words first")
    page.goto(f"{server_url}/?similar=nope.jpg")
    expect(page.locator("#status.error")).to_have_text("Search failed: no image 'nope.jpg' in this index")
    expect(hits).to_have_count(0)
    page.set_input_files("#upload", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hi"}])
    expect(page.locator("#status.error")).to_contain_text("unsupported upload type 'text/plain'")


def test_one_score_scale_and_rank_base_everywhere(index, client):
    """The same query scores the same and ranks from 1 in the Python API, `cbir search --json` and the
    HTTP API; an image searched for itself scores the same whichever way it is asked: the calibrated
    chance of a match at its vector's length, near 1."""
    import json

    from cbir.cli import app

    text = "a dog in a kitchen"
    api = index.search_text(text, k=3)
    combined = index.search(text, k=3)
    cli = json.loads(
        CliRunner().invoke(app, ["search", text, "--index", str(index.path), "-k", "3", "--json"]).output
    )
    http = client.get("/api/search", params={"q": text, "k": 3}).json()["results"]
    for rows in ([(r.rank, r.score) for r in combined], [(r["rank"], r["score"]) for r in cli],
                 [(h["rank"], h["score"]) for h in http]):  # fmt: skip
        assert [rank for rank, _ in rows] == [1, 2, 3]
        assert [score for _, score in rows] == pytest.approx([r.score for r in api], abs=1e-6)
    self_scores = [
        index.search_similar("7.jpg", k=1)[0].score,
        index.search(image=IMAGES / "7.jpg", k=1)[0].score,
        client.get("/api/similar/7.jpg", params={"k": 1}).json()["results"][0]["score"],
    ]
    from cbir.calibration import match_scores

    # scored by the photo curve (a photo matches a description of itself: well above even odds)
    own = float(match_scores(index.model, [float(np.linalg.norm(index.vector("7.jpg")))], photo_share=1.0)[0])
    assert self_scores == pytest.approx([own] * 3, abs=1e-4) and own > 0.5


# ---- steering (issue 14): query arithmetic, feedback and filters through /api/search and the page -----


def test_search_api_takes_arithmetic_feedback_and_filters(client, index):
    q = '"a dog" + snow:0.5 - people'
    page = client.get("/api/search", params={"q": q, "k": 5}).json()
    assert ids_of(page) == [r.id for r in index.find(q, k=5)]
    plain = [r.id for r in index.find("a plate of food", k=20)]
    params = {"q": "a plate of food", "k": 5, "more_like": [plain[12], plain[15]], "less_like": plain[0]}
    steered = client.get("/api/search", params=params).json()
    expected = index.find("a plate of food", more_like=plain[12:16:3], less_like=plain[:1], k=5)
    assert ids_of(steered) == [r.id for r in expected] and plain[0] not in ids_of(steered)
    similar = client.get("/api/search", params={"q": f"id:{plain[3]}", "k": 1}).json()
    assert ids_of(similar) == [plain[3]]
    # Filters narrow before ranking: every photo here was modified after 2000, none after 2100.
    assert (
        len(client.get("/api/search", params={"q": "a dog", "after": "2000-01-01"}).json()["results"]) == 20
    )
    assert client.get("/api/search", params={"q": "a dog", "after": "2100-01-01"}).json()["results"] == []
    assert client.get("/api/search", params={"q": "a dog", "folder": "nowhere"}).json()["results"] == []


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"q": "a dog + + snow"}, "an operator with nothing after it"),
        ({"q": "img:/etc/passwd"}, "file paths are not accepted"),
        ({"q": "a dog", "more_like": "nope.jpg"}, "no image 'nope.jpg' in this index"),
        ({"q": "a dog", "before": "soon"}, "'soon' is not a date"),
    ],
)
def test_bad_steering_is_422_with_a_reason(client, params, message):
    response = client.get("/api/search", params=params)
    assert response.status_code == 422 and message in response.json()["detail"]


def test_page_feedback_and_filters_in_chromium(browser_page, server_url, index):
    from playwright.sync_api import expect

    page = browser_page
    query = "a plate of food on a table"
    page.goto(server_url)
    page.fill("#query", query)
    page.press("#query", "Enter")
    hits = page.locator("#results .hit")
    expect(hits).to_have_count(24)
    before = hits.locator(".caption a").all_inner_texts()
    good, bad = before[20], before[0]
    hits.nth(20).locator("button.mark.good").click()
    hits.nth(0).locator("button.mark.bad").click()
    expect(page.locator("#rerank")).to_have_text("Re-rank with 2 marked")
    page.click("#rerank")
    expect(page.locator("#status")).to_have_text(
        f"24 results for “{query}” re-ranked by 2 marked photos, best first."
    )
    expected = [r.id for r in index.find(query, more_like=[good], less_like=[bad], k=24)]
    assert hits.locator(".caption a").all_inner_texts() == expected
    assert hits.locator(".caption a").all_inner_texts().index(good) < 3
    expect(hits.nth(expected.index(good))).to_have_attribute("data-mark", "good")
    if os.environ.get("CBIR_WRITE_SCREENSHOT"):
        wait_for_thumbnails(page)
        save_screenshot(page.screenshot(), REPO / "docs" / "web-feedback.png")

    # A filter that no photo passes empties the grid and says so.
    page.click("#filters summary")
    page.fill("#filter-after", "2100-01-01")
    page.locator("#filter-after").dispatch_event("change")
    expect(page.locator("#status")).to_contain_text("No photos found")
    expect(hits).to_have_count(0)


def wait_for_thumbnails(page) -> None:
    """Until every result thumbnail has loaded. A property check, not `wait_for_function`: when its
    condition is not true at once, Playwright polls it through eval, which the page's CSP refuses."""
    from playwright.sync_api import expect

    thumbnails = page.locator("#results img")
    for i in range(thumbnails.count()):
        expect(thumbnails.nth(i)).to_have_js_property("complete", True)
