"""`cbir serve` (issue 14): searches batched instead of queued behind a lock, a server that answers
while it loads, explanations in the API and on the page, and the empty index on the page."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests import test_server as served
from tests.test_server import free_port

# The fixtures of the server tests: the same real index (80 COCO photos, shipped default model).
index, client, browser_page = served.index, served.client, served.browser_page

EXPLAIN_SCREENSHOT = served.REPO / "docs" / "web-explain.png"
QUERIES = ["a dog", "a plate of food", "a red bus", "people on a beach", "a cat on a bed", "a train"]


def wait_for(condition, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_concurrent_searches_are_answered_in_one_batch_with_the_index_ranking(index, monkeypatch):
    """While one search runs, the others wait in the queue; the next batch takes them all at once,
    and each caller gets what the index alone would answer."""
    from cbir.server.batching import SearchBatcher

    batcher = SearchBatcher(index)
    gate, sizes = threading.Event(), []
    real = index.search_vectors

    def held(queries, k, min_score=None, **options):
        sizes.append(len(queries))
        gate.wait(30)
        return real(queries, k, min_score, **options)

    expected_similar = [r.id for r in index.search_similar("7.jpg", k=3)]
    monkeypatch.setattr(index, "search_vectors", held)
    with ThreadPoolExecutor(len(QUERIES) + 2) as pool:
        first = pool.submit(batcher.search_text, "a kitchen", 4)
        wait_for(lambda: sizes == [1])
        texts = [pool.submit(batcher.search_text, q, 5) for q in QUERIES]
        similar = pool.submit(batcher.search_vector, index.vector("7.jpg"), 3)
        wait_for(lambda: batcher._jobs.qsize() == len(QUERIES) + 1)
        gate.set()
        answers = [f.result(30) for f in texts]
        assert [r.id for r in similar.result(30)] == expected_similar
        assert len(first.result(30)) == 4
    assert sizes == [1, len(QUERIES) + 1]
    monkeypatch.undo()
    for query, found in zip(QUERIES, answers, strict=True):
        expected = index.search_text(query, k=5)
        assert [(r.id, r.rank) for r in found] == [(r.id, r.rank) for r in expected]
        assert [r.score for r in found] == pytest.approx([r.score for r in expected], abs=1e-5)


def test_a_bad_query_in_a_batch_fails_alone(index):
    from cbir.server.batching import Job, SearchBatcher

    batcher = SearchBatcher(index)
    jobs = [Job(3, text="a dog"), Job(3, text="   "), Job(3, text="a bus")]
    batcher._run(jobs)
    with pytest.raises(ValueError, match="empty text query"):
        jobs[1].done.result(5)
    assert [r.id for r in jobs[2].done.result(5)] == [r.id for r in index.search_text("a bus", k=3)]


def test_health_says_loading_until_the_index_is_open(index, monkeypatch):
    """`cbir serve` answers at once: health says `loading` and searches 503 until the index is open."""
    from fastapi.testclient import TestClient

    import cbir.server.app as server
    from cbir.index import SearchIndex

    opening, ready = threading.Event(), []
    real_open = SearchIndex.open

    def slow_open(path):
        opening.wait(30)
        return real_open(path)

    monkeypatch.setattr(server.SearchIndex, "open", staticmethod(slow_open))
    web = server.create_app(index.path, load_in_background=True, on_ready=ready.append)
    with TestClient(web) as c:
        assert c.get("/api/health").json() == {
            "status": "loading", "images": 0, "loading": True, "calibrated": None, "detail": None,
        }  # fmt: skip
        refused = c.get("/api/search", params={"q": "a dog"})
        assert refused.status_code == 503 and "still loading" in refused.json()["detail"]
        opening.set()
        wait_for(lambda: c.get("/api/health").json()["status"] == "ok", 120)
        health = c.get("/api/health").json()
        assert health["images"] == 80 and health["loading"] is False
        assert health["calibrated"] == index.calibrated
        assert c.get("/api/search", params={"q": "a dog", "k": 2}).status_code == 200
    assert len(ready) == 1 and len(ready[0]) == 80 and web.state.index is ready[0]


def test_a_failed_load_is_reported_by_health_and_searches(tmp_path):
    from fastapi.testclient import TestClient

    from cbir.server import create_app

    (tmp_path / "index.json").write_text("{ not json")
    with TestClient(create_app(tmp_path, load_in_background=True)) as c:
        wait_for(lambda: c.get("/api/health").json()["status"] != "loading")
        health = c.get("/api/health").json()
        assert health["status"] == "error" and "malformed JSON" in health["detail"]
        refused = c.get("/api/search", params={"q": "a dog"})
        assert refused.status_code == 503 and "could not be opened" in refused.json()["detail"]


def test_explanations_in_the_api(client, index):
    plain = client.get("/api/search", params={"q": "a plate of food on a table", "k": 3}).json()
    assert all(h["explanation"] is None and h["why"] is None for h in plain["results"])
    page = client.get(
        "/api/search", params={"q": "a plate of food on a table", "k": 3, "explain": True}
    ).json()
    assert [h["id"] for h in page["results"]] == [h["id"] for h in plain["results"]]
    for hit in page["results"]:
        why = hit["explanation"]
        assert {w["word"] for w in why["query_words"]} <= {"a", "plate", "of", "food", "on", "table"}
        assert len(why["classes"]) == 3 and all(0 <= c["probability"] <= 1 for c in why["classes"])
        assert len(why["words"]) == 5
        assert hit["why"].startswith("matched ") and " · sees " in hit["why"]
    similar = client.get("/api/similar/7.jpg", params={"k": 2, "explain": True}).json()["results"]
    assert similar[0]["explanation"]["query_words"] == [] and similar[0]["why"].startswith("sees ")


def serve_in_thread(app):
    """The app served by uvicorn on a free loopback port, in a thread: (url, stop)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started)

    def stop() -> None:
        server.should_exit = True
        thread.join(10)

    return f"http://127.0.0.1:{server.config.port}", stop


def test_page_explanations_and_empty_index_in_chromium(browser_page, index, tmp_path):
    from playwright.sync_api import expect

    from cbir.index import build_index
    from cbir.server import create_app

    page = browser_page
    url, stop = serve_in_thread(create_app(index))
    try:
        page.goto(url)
        expect(page.locator("#index-info")).to_have_text("80 photos indexed")
        page.check("#explain")
        page.fill("#query", "a plate of food on a table")
        page.press("#query", "Enter")
        hits = page.locator("#results .hit")
        expect(hits).to_have_count(24, timeout=180_000)  # the first explanation embeds the vocabulary
        why = hits.first.locator(".why")
        expect(why).to_contain_text("sees ")
        expected = index.search_text("a plate of food on a table", k=1)
        from cbir.explain import explain

        line = explain(index, expected, "a plate of food on a table")[0].line()
        expect(why).to_have_text(line)
        assert line in hits.first.locator("button.photo").get_attribute("title")
        page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete)")
        shot = EXPLAIN_SCREENSHOT if os.environ.get("CBIR_WRITE_SCREENSHOT") else tmp_path / "explain.png"
        served.save_screenshot(page.screenshot(), shot)
        page.uncheck("#explain")  # searches again, without explanations
        expect(hits.first.locator(".why")).to_have_count(0)
    finally:
        stop()

    (tmp_path / "empty").mkdir()
    empty = build_index(tmp_path / "empty", tmp_path / "empty-index", progress=False)
    url, stop = serve_in_thread(create_app(empty))
    try:
        page.goto(url)
        expect(page.locator("#index-info")).to_have_text("0 photos indexed")
        expect(page.locator("#status.error")).to_have_text(
            "The index is empty: there is nothing to search yet."
        )
        page.fill("#query", "a dog")
        page.press("#query", "Enter")
        expect(page.locator("#status")).to_have_text("No photos found for “a dog”.")
    finally:
        stop()
