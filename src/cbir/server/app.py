"""The HTTP face of a `SearchIndex`: a JSON API, thumbnails and full images of indexed files, and the page.

The index (and with it the encoders) is opened once, in `create_app` or, for `cbir serve`, on a thread
while the server already answers (`/api/health` says `loading`, searches 503). Requests only search,
batched on one worker (`batching.SearchBatcher`) instead of queueing behind a lock. Every image the
server sends is looked up by id in the index, never by a path from the request, so nothing outside the
index can be reached.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.middleware.trustedhost import TrustedHostMiddleware

from cbir import __version__
from cbir.explain import Explanation
from cbir.explain import explain as explain_results
from cbir.filters import Filters
from cbir.index import SearchIndex, SearchResult, printable
from cbir.query import is_plain, parse_query, query_words
from cbir.server.batching import SearchBatcher
from cbir.steer import search_page, steered_vector

STATIC = Path(__file__).parent / "static"
log = logging.getLogger(__name__)
MAX_QUERY_CHARS = 300
MAX_K = 100
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MULTIPART_OVERHEAD = 64 * 1024
MAX_UPLOAD_PIXELS = 40_000_000
UPLOAD_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP", "image/gif": "GIF"}
THUMB_SIZE = 320
THUMB_CACHE = 4096  # thumbnails kept in memory (~10 KB each)
# Sent with every response: no MIME sniffing of served files, no framing (clickjacking).
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
# What the page needs: its own script and style, thumbnails, and a blob: preview of an uploaded photo.
# The API docs (/docs, /redoc) load Swagger UI from a CDN with inline script and go without it.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob:; script-src 'self'; style-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


PageSize = Annotated[int, Query(ge=1, le=MAX_K, description="Results per page.")]
Offset = Annotated[int, Query(ge=0, description="Results to skip (pagination).")]
Explain = Annotated[
    bool, Query(description="Add why each photo matched: query words that carried it, what it shows.")
]
ImageId = Annotated[str, PathParam(description="Image id: its path relative to the indexed folder.")]


class Hit(BaseModel):
    rank: int  # 1 = best
    score: float  # P(match) when the model is calibrated, else the similarity (see Health.calibrated)
    id: str  # `printable`: a name that is not UTF-8 shows its bytes as \\xNN, and is asked for so
    image: str
    thumb: str
    explanation: dict[str, Any] | None = None  # with explain=true: cbir.explain.Explanation.to_dict()
    why: str | None = None  # the same explanation as one line (the page's tooltip)


class Page(BaseModel):
    """One page of results; `more` says whether asking again with `offset + k` would return any."""

    query: dict[str, str]
    offset: int
    k: int
    more: bool
    results: list[Hit]


class Health(BaseModel):
    status: str  # ok, loading (the index and its model are still being opened) or error
    images: int
    loading: bool = False
    calibrated: bool | None = None  # scores are P(match) (None while loading)
    detail: str | None = None  # why loading failed


class Problem(BaseModel):
    """Every error answer: one sentence the page shows as is."""

    detail: str


ERRORS = {
    404: "No such image in this index, or its file is gone or changed since it was indexed.",
    413: "The upload is too large (bytes or pixels).",
    415: "The upload is not an image of an accepted type.",
    422: "A parameter is missing or invalid.",
}


def errors(*codes: int) -> dict[int | str, dict]:
    """OpenAPI documentation of the error answers a route gives (clients and fuzzers read it)."""
    return {code: {"model": Problem, "description": ERRORS[code]} for code in codes}


def image_url(image_id: str, kind: str = "images") -> str:
    return f"/{kind}/{quote(image_id)}"


def hit_of(result: SearchResult, why: Explanation | None = None) -> Hit:
    """A result as the API shows it: named by its `printable` id, which is also how it is asked for."""
    name = printable(result.id)
    return Hit(
        rank=result.rank, score=result.score, id=name, image=image_url(name), thumb=image_url(name, "thumbs"),
        explanation=why.to_dict() if why else None, why=why.line() if why else None,
    )  # fmt: skip


class Thumbnails:
    """JPEG thumbnails of indexed images, made with Pillow on first request and kept (LRU) in memory."""

    def __init__(self, size: int = THUMB_SIZE, capacity: int = THUMB_CACHE):
        self.size, self.capacity = size, capacity
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, image_id: str, path: Path) -> bytes:
        with self._lock:
            if image_id in self._cache:
                self._cache.move_to_end(image_id)
                return self._cache[image_id]
        data = self._render(path)
        with self._lock:
            self._cache[image_id] = data
            if len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return data

    def _render(self, path: Path) -> bytes:
        from PIL import Image

        from cbir.imaging import to_rgb

        with Image.open(path) as im:
            im = to_rgb(im, self.size)
            im.thumbnail((self.size, self.size))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=82)
        return buf.getvalue()


def read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    """The upload's bytes, refused with a 4xx unless it is an image of an accepted type and size."""
    from PIL import Image

    data = upload.file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise HTTPException(413, f"image too large (limit {max_bytes / 2**20:.0f} MiB)")
    if not data:
        raise HTTPException(422, "the uploaded file is empty")
    accepted = ", ".join(UPLOAD_TYPES)
    if upload.content_type not in UPLOAD_TYPES:
        raise HTTPException(415, f"unsupported upload type '{upload.content_type}' (accepted: {accepted})")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in UPLOAD_TYPES.values():
                raise HTTPException(415, f"'{upload.filename}' is {im.format}, not one of: {accepted}")
            if im.width * im.height > MAX_UPLOAD_PIXELS:
                raise HTTPException(413, f"'{upload.filename}' has too many pixels ({im.width}x{im.height})")
            im.load()  # decodes it all: a truncated file fails here, not in the encoder
    except HTTPException:
        raise
    except Exception as e:  # Pillow raises many types for non-images and truncated files
        raise HTTPException(415, f"'{upload.filename}' is not an image that can be read") from e
    return data


def warm_up(index: SearchIndex) -> None:
    """Load both query encoders now, so no request pays for it: one sentence, one small plain image."""
    from PIL import Image

    index.search_text("warm up", k=1)
    blank = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(blank, "PNG")
    index.search_image(blank.getvalue(), k=1)


class Loader:
    """The index as the app sees it: being opened (on a thread, for `cbir serve`), open, or failed."""

    def __init__(self) -> None:
        self.index: SearchIndex | None = None
        self.batcher: SearchBatcher | None = None
        self.error: str | None = None

    def load(self, source: SearchIndex | Path | str, on_ready=None) -> None:
        try:
            index = source if isinstance(source, SearchIndex) else SearchIndex.open(source)
            warm_up(index)
        except Exception as e:  # reported by /api/health and every search, not lost in a thread
            self.error = f"{type(e).__name__}: {e}"
            raise
        self.batcher = SearchBatcher(index)
        self.index = index
        if on_ready is not None:
            on_ready(index)

    def publish(self, updated: SearchIndex) -> None:
        """A newer snapshot of the same index (the folder watcher's), warmed up before it serves."""
        warm_up(updated)
        self.batcher.index = updated
        self.index = updated

    def ready(self) -> tuple[SearchIndex, SearchBatcher]:
        if self.index is None or self.batcher is None:
            detail = f"the index could not be opened: {self.error}" if self.error else None
            raise HTTPException(503, detail or "still loading the index; try again in a moment")
        return self.index, self.batcher


def create_app(
    index: SearchIndex | Path | str,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    thumb_size: int = THUMB_SIZE,
    allowed_hosts: Sequence[str] | None = None,
    watch: float | None = None,
    load_in_background: bool = False,
    on_ready=None,
) -> FastAPI:
    """A FastAPI app over one index. A path is opened (and its encoders warmed up) here, once; with
    `load_in_background` that happens on a thread and the app answers at once (health: loading),
    calling `on_ready(index)` when done.

    `allowed_hosts` are the Host header values answered (others get 400: DNS rebinding against a
    server on localhost); None answers any, for embedding the app behind a proxy that checks.
    `watch` (seconds) follows the indexed folder: new, changed and deleted photos are indexed and
    searchable within about that time (`app.state.watcher`; stop it with `.stop()`).
    """
    loader = Loader()
    thumbs = Thumbnails(thumb_size)
    # The image encoder (uploads, and the ImageNet classes of explanations) one request at a time;
    # searches go on meanwhile.
    encoder_lock = threading.Lock()

    app = FastAPI(
        title="cbir",
        summary="Search indexed photos by sentence or by example.",
        version=__version__,
        max_body_size=max_upload_bytes + MULTIPART_OVERHEAD,  # refused (413) before it is parsed
        responses=errors(422),
    )
    app.state.loader = loader
    app.state.index = None
    app.state.watcher = None

    def publish(updated: SearchIndex) -> None:
        """Swap in a newer snapshot of the index (from the watcher); searches in flight finish on the
        snapshot they started with."""
        loader.publish(updated)
        app.state.index = updated

    def opened(index: SearchIndex) -> None:
        app.state.index = index
        if watch:
            from cbir.library import Watcher

            app.state.watcher = Watcher(index, publish, watch, lambda e: log.warning("cbir watch: %s", e))
            app.state.watcher.start()
        if on_ready is not None:
            on_ready(index)

    if load_in_background:
        threading.Thread(target=_load_quietly, args=(loader, index, opened), daemon=True).start()
    else:
        loader.load(index, opened)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    unframed_docs = {app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}

    @app.middleware("http")
    async def security_headers(request: Request, call_next) -> Response:
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        if request.url.path not in unframed_docs:
            response.headers["Content-Security-Policy"] = PAGE_CSP
        return response

    @app.exception_handler(RequestValidationError)
    async def readable_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        """One sentence per bad parameter, so the page can show it as is."""
        parts = [f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)

    def page(query: dict[str, str], offset: int, k: int, run, explain: bool = False) -> Page:
        index, _ = loader.ready()
        found: list[SearchResult] = run(min(offset + k + 1, len(index)))
        shown = found[offset : offset + k]
        explanations: list = [None] * len(shown)
        if explain:
            with encoder_lock:
                explanations = explain_results(index, shown, query_words(query.get("text")))
        hits = [hit_of(r, why) for r, why in zip(shown, explanations, strict=True)]
        return Page(query=query, offset=offset, k=k, more=len(found) > offset + k, results=hits)

    def steered(q: str, more_like: list[str], less_like: list[str], filters: Filters):
        """How to fetch n results of a text search: a plain sentence goes to the batcher as is;
        arithmetic and feedback make one vector here (under the encoder lock, as the query may name
        photos); filters then rank only the photos they pass."""
        index, batcher = loader.ready()
        terms = parse_query(q)
        if not filters and not more_like and not less_like and is_plain(terms):
            return lambda n: batcher.search_text(terms[0].value, n)
        with encoder_lock:
            vector, share = steered_vector(index, q, None, more_like, less_like, allow_files=False)
        if filters:
            return lambda n: search_page(index, vector, filters, n, 0, None, share)
        return lambda n: batcher.search_vector(vector, n, share)

    def known(image_id: str) -> str:
        """The index's id of an image named as the API shows it."""
        index, _ = loader.ready()
        try:
            return index.id_of(image_id)
        except KeyError:
            raise HTTPException(404, f"no image '{image_id}' in this index") from None

    @app.get("/api/health", response_model=Health)
    def health() -> Health:
        """`loading` until the index and its model are open (searches answer 503 meanwhile)."""
        if loader.index is None:
            status = "error" if loader.error else "loading"
            return Health(status=status, images=0, loading=not loader.error, detail=loader.error)
        return Health(status="ok", images=len(loader.index), calibrated=loader.index.calibrated)

    @app.get("/api/search", response_model=Page)
    def search_text(
        q: Annotated[
            str,
            Query(
                min_length=1,
                max_length=MAX_QUERY_CHARS,
                description='What to look for: a sentence, or terms joined by + and - ("a dog" + beach - '
                "people), weighted as snow:0.5, indexed photos as id:IMAGE_ID.",
            ),
        ],
        k: PageSize = 20,
        offset: Offset = 0,
        more_like: Annotated[list[str], Query(description="Ids of photos marked good (feedback).")] = [],  # noqa: B006
        less_like: Annotated[list[str], Query(description="Ids of photos marked bad (feedback).")] = [],  # noqa: B006
        folder: Annotated[str | None, Query(description="Only photos below this folder (relative).")] = None,
        after: Annotated[str | None, Query(description="Only photos taken (else modified) on/after.")] = None,
        before: Annotated[str | None, Query(description="Only photos taken (else modified) before.")] = None,
        camera: Annotated[
            str | None, Query(description="Only photos whose EXIF camera contains this.")
        ] = None,
        explain: Explain = False,
    ) -> Page:
        """Images ranked by how well they match `q`, refined by feedback, among photos the filters pass."""
        if not q.strip():
            raise HTTPException(422, "q: the query is blank")
        try:
            run = steered(q, more_like, less_like, Filters.parse(folder, after, before, camera))
            return page({"text": q}, offset, k, run, explain)
        except ValueError as e:  # a malformed query or filter, an unknown id: the message says which
            raise HTTPException(422, str(e)) from e

    @app.get("/api/similar/{image_id:path}", response_model=Page, responses=errors(404))
    def search_similar(
        image_id: ImageId, k: PageSize = 20, offset: Offset = 0, explain: Explain = False
    ) -> Page:
        """Images ranked by similarity to an indexed image."""
        index, batcher = loader.ready()
        vector = index.vector(known(image_id))
        query = {"similar": image_id}
        return page(query, offset, k, lambda n: batcher.search_vector(vector, n, photo_share=1.0), explain)

    @app.post("/api/search/image", response_model=Page, responses=errors(413, 415))
    def search_upload(
        file: Annotated[UploadFile, File(description="JPEG, PNG, WebP or GIF image.")],
        k: PageSize = 20,
        offset: Offset = 0,
        explain: Explain = False,
    ) -> Page:
        """Images ranked by similarity to an uploaded photo."""
        index, batcher = loader.ready()
        data = read_upload(file, max_upload_bytes)
        try:
            with encoder_lock:
                vector = index.embed_image(data)
        except ValueError as e:  # the encoder could not use it after all
            raise HTTPException(422, f"'{file.filename}' could not be embedded") from e
        query = {"upload": file.filename or "upload"}
        return page(query, offset, k, lambda n: batcher.search_vector(vector, n, photo_share=1.0), explain)

    def indexed_file(image_id: str) -> Path:
        index, _ = loader.ready()
        try:
            return index.indexed_file(known(image_id))
        except FileNotFoundError as e:
            raise HTTPException(404, f"image '{image_id}' is gone or changed since it was indexed") from e

    @app.get("/images/{image_id:path}", response_class=FileResponse, responses=errors(404))
    def full_image(image_id: ImageId) -> FileResponse:
        """The indexed image file itself (404 once it is deleted or replaced)."""
        return FileResponse(indexed_file(image_id))

    @app.get("/thumbs/{image_id:path}", response_class=Response, responses=errors(404))
    def thumbnail(image_id: ImageId) -> Response:
        """A JPEG thumbnail of an indexed image (longer side `thumb_size` pixels)."""
        try:
            data = thumbs.get(image_id, indexed_file(image_id))
        except OSError as e:
            raise HTTPException(404, f"cannot read image '{image_id}': {e}") from e
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/", include_in_schema=False)
    def home() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _load_quietly(loader: Loader, index: Path | str, on_ready) -> None:
    """The background load: a failure is kept in `loader.error` (health and searches report it) and
    said on stderr."""
    try:
        loader.load(index, on_ready)
    except Exception:
        print(f"error: cannot serve {index}: {loader.error}", file=sys.stderr, flush=True)
