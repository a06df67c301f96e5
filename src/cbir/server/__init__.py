"""`cbir serve`: the web page and HTTP API over a search index (FastAPI, served by uvicorn)."""

from cbir.server.app import create_app

__all__ = ["create_app"]
