"""`create_app(model, ...)`: the FastAPI app of `blipkit serve`, with no global state (test it with TestClient).

Each POST endpoint parses its request at the edge (`inputs.parse`: images decoded from bytes, options validated),
hands a `jobs.Job` to the batcher, which gathers concurrent jobs of one kind and options into one model call (with
`process=True`, made in a process of its own: `worker.ModelProcess`), and returns JSON. The page at `/` and the
API docs at `/docs` are static files of this package (no CDN).
"""

from __future__ import annotations

import base64
import io
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..base import BlipBase
from ..errors import BlipkitError
from ..tasks.common import has_itc, has_itm
from . import jobs
from .batching import Batcher
from .inputs import ApiError, Guard, Limits, blipkit_status, check_texts, error_response, parse, validation_message
from .metrics import Metrics
from .options import (
    AskOptions,
    AttentionOptions,
    CaptionOptions,
    ClassifyOptions,
    GroundOptions,
    SearchOptions,
    TextsOptions,
)
from .worker import ModelProcess, ModelProcessError

STATIC = Path(__file__).parent / "static"
OPEN_PATHS = ("/", "/docs", "/openapi.json", "/api/health", "/favicon.ico")
THUMBNAIL = 160  # pixels, the longer side of a search hit's thumbnail
PREPROCESSED = ("match", "similarity", "caption", "ask")  # kinds whose jobs carry pixels made at the edge
ARRIVED: ContextVar[Callable[[], None]] = ContextVar("arrived", default=lambda: None)  # the request's `coming()`


def capabilities(model: BlipBase) -> dict[str, bool]:
    """Which endpoints the model can serve (by the parts it has)."""
    has = model.has
    stack = any(has(p) for p in ("text_encoder", "qformer", "text_decoder"))
    return {
        "match": has_itc(model) or has_itm(model),
        "similarity": has_itc(model),
        "caption": has("text_decoder") or has("language_model"),
        "ask": (has("text_encoder") and has("text_decoder")) or has("language_model"),
        "classify": has_itc(model) or has_itm(model),
        "ground": has_itm(model) and (has("text_encoder") or has("qformer")),
        "attention": stack,
    }


def png_data_url(figure: Any) -> str:
    """A matplotlib Figure as a `data:image/png;base64,...` URL."""
    from ..tasks.render import DPI

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def thumbnail_data_url(path: str, side: int = THUMBNAIL) -> str | None:
    """A JPEG thumbnail of an indexed image (by the path the index stores), or None when it cannot be read."""
    from ..collections.readers import item_of_path
    from ..processing import load_image

    item = item_of_path(path)
    if item.error is not None:
        return None
    try:
        with Image.open(io.BytesIO(item.read_bytes())) as opened:
            opened.draft("RGB", (side * 2, side * 2))  # JPEG: decode at a reduced size
            image = load_image(opened)
    except (OSError, ValueError, SyntaxError, BlipkitError, Image.DecompressionBombError):
        return None
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _body_doc(options: type[BaseModel], images: tuple[int, int]) -> dict[str, Any]:
    """OpenAPI request bodies of an endpoint: multipart with `image` files, or JSON with base64 `images`."""
    schema = options.model_json_schema()
    fields = schema.get("properties", {})
    many = f"{images[0]} to {images[1]}" if images[0] != images[1] else f"{images[0]}"
    form = {"type": "object", "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": f"{many} image files (repeat the field)"}, **fields}}
    body = {"type": "object", "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "byte"},
                   "description": f"{many} images, base64 (or data: URLs)"}, **fields}}
    required = schema.get("required", [])
    if required:
        form["required"] = body["required"] = required
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form},
                                                          "application/json": {"schema": body}}}}


def _install_errors(app: FastAPI) -> None:
    """Every error a JSON object {"error", "field"?}; bad input never a 500."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), getattr(e, "field", None), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        message, field = validation_message(e)
        return error_response(422, message, field)

    @app.exception_handler(BlipkitError)
    async def blipkit_error(request: Request, e: BlipkitError):
        return error_response(blipkit_status(e), str(e))

    @app.exception_handler(ModelProcessError)
    async def process_stopped(request: Request, e: ModelProcessError):
        return error_response(503, str(e))  # killed or out of memory: the next request starts a new one

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception):
        return error_response(500, f"internal error ({type(e).__name__}); the server log has the details")


def _timing(app: Any, metrics: Metrics, paths: set[str]) -> Callable:
    """ASGI middleware that counts every request and its latency (unknown paths as 'other')."""

    async def middleware(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def watched(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, watched)
        finally:
            path = scope["path"] if scope["path"] in paths else "other"
            metrics.request(path, scope["method"], status, time.perf_counter() - start)

    return middleware


def create_app(
    model: BlipBase,
    index: Any = None,
    max_batch: int = 16,
    max_wait_ms: float = 5.0,
    limits: Limits | None = None,
    api_key: str | None = None,
    process: bool = False,
    threads: int | None = None,
    gather: float = 0.0,
) -> FastAPI:
    """The FastAPI app serving `model` (and, for /api/search, `index`: a `blipkit.Index`).

    Args:
        max_batch: most requests of one kind in one model call (1: no batching).
        max_wait_ms: longest a request waits for others to join its batch (with `gather`, the least a free model
            may wait for them).
        limits: request limits (body size, images, pixels, texts).
        api_key: when given, every endpoint except the page, the docs and /api/health needs it.
        process: run the model calls in a process of their own (`worker.ModelProcess`), so they never wait for the
            server's interpreter lock; /api/search stays in this process.
        threads: torch threads of that process (default: one less than the cores; without `process`, the model
            calls use this process's torch setting).
        gather: once the model is free, wait for as many requests as its last call had in flight, at most this
            fraction of that call (`Batcher`; e.g. 0.5); 0 (the default): start at once what is queued. A lone
            request never waits either way.
    """
    limits = limits or Limits()
    metrics = Metrics()
    batcher = Batcher(max_batch, max_wait_ms, on_batch=metrics.batch, eager=True, gather=gather)
    can = capabilities(model)
    child = ModelProcess(model, threads) if process else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal child
        if child is not None:
            try:
                child.start()  # loads while the server starts, not on the first request
            except Exception as e:  # noqa: BLE001 - e.g. a model that cannot be pickled: serve it here
                print(f"blipkit serve: the model cannot run in a process of its own ({type(e).__name__}: {e}); "
                      "its calls run in the server's process", file=sys.stderr)
                child = app.state.process = None
        yield
        await run_in_threadpool(batcher.close)
        if child is not None:
            await run_in_threadpool(child.close)

    app = FastAPI(title="blipkit", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description=f"BLIP / BLIP-2 over HTTP, serving {model.name_or_path}. Images are multipart file "
                              "fields named `image` or base64 strings in a JSON `images` list.")
    app.state.model, app.state.index, app.state.batcher, app.state.metrics = model, index, batcher, metrics
    app.state.process = child
    _install_errors(app)

    def post(path: str, options: type[BaseModel], images: tuple[int, int], summary: str):
        """Register `compute(images, options) -> dict` as a POST endpoint that parses its request at the edge."""

        def register(compute: Callable[[list[Image.Image], Any], Awaitable[dict]]):
            kind = path.rsplit("/", 1)[-1]
            # resized and normalised with the decoding, off the event loop, while the model works on other requests
            prepare = model.pixels if kind in PREPROCESSED and can[kind] else None

            async def endpoint(request: Request) -> dict:
                with batcher.coming() as arrived:  # a batch waits for this request until it is queued (run)
                    token = ARRIVED.set(arrived)
                    try:
                        decoded, opts = await parse(request, options, limits, images, prepare)
                        return {"model": model.name_or_path, **await compute(decoded, opts)}
                    finally:
                        ARRIVED.reset(token)

            app.add_api_route(path, endpoint, methods=["POST"], summary=summary, description=compute.__doc__,
                              openapi_extra=_body_doc(options, images), name=kind,
                              tags=["tasks"])
            return compute

        return register

    async def run(kind: str, job: jobs.Job, key: Any = (), batch: bool = True):
        if not can.get(kind, True):
            raise ApiError(400, f"{model.name_or_path} cannot {kind}: see GET /api/models for what it serves")
        if kind in PREPROCESSED:
            job.pixels = getattr(job.images, "pixels", None)  # made with the decoding (parse)
        call = partial(child.run, kind) if child is not None else partial(getattr(jobs, kind), model)
        return await batcher.submit(kind, job, call, key, batch, arrived=ARRIVED.get())

    many = (1, limits.max_images)

    @post("/api/match", TextsOptions, many, "ITC and ITM scores of every image with every text")
    async def match(images: list[Image.Image], o: TextsOptions) -> dict:
        """Per image, one object per text with its ITC cosine (`itc`) and ITM match probability (`itm`)."""
        texts = check_texts(o.texts, "texts", limits)
        out = await run("match", jobs.Job(images, texts))
        return {"results": [{"image": i, "matches": m} for i, m in enumerate(out)]}

    @post("/api/similarity", TextsOptions, many, "ITC cosine similarity, images x texts")
    async def similarity(images: list[Image.Image], o: TextsOptions) -> dict:
        """The ITC cosine similarity of every image (rows) with every text (columns)."""
        texts = check_texts(o.texts, "texts", limits)
        return {"texts": texts, "scores": await run("similarity", jobs.Job(images, texts))}

    @post("/api/caption", CaptionOptions, many, "caption images")
    async def caption(images: list[Image.Image], o: CaptionOptions) -> dict:
        """A caption per image (a list with num_captions > 1; with return_scores, each with its log-probability)."""
        if o.prompt is not None:
            check_texts([o.prompt], "prompt", limits)
        options = o.model_options()
        if not o.do_sample:
            options.pop("seed")  # irrelevant: greedy / beam requests of equal options batch together
        key = tuple(sorted(options.items()))
        out = await run("caption", jobs.Job(images, options=options), key, batch=not o.do_sample)

        def item(c: Any) -> Any:
            return {"text": c[0], "score": c[1]} if isinstance(c, tuple) else c

        return {"results": [{"image": i, "captions" if isinstance(c, list) else "caption":
                             [item(x) for x in c] if isinstance(c, list) else item(c)} for i, c in enumerate(out)]}

    @post("/api/ask", AskOptions, many, "answer a question about each image (VQA)")
    async def ask(images: list[Image.Image], o: AskOptions) -> dict:
        """The answer to `question` about each image: generated, or the best of `answers`."""
        question = check_texts([o.question], "question", limits)[0]
        answers = check_texts(o.answers, "answers", limits) if o.answers is not None else None
        options = {"answers": answers, "num_beams": o.num_beams}
        key = (tuple(answers) if answers else None, o.num_beams)
        out = await run("ask", jobs.Job(images, [question], options), key)
        return {"results": [{"image": i, "question": question, "answer": a} for i, a in enumerate(out)]}

    @post("/api/classify", ClassifyOptions, many, "zero-shot classification")
    async def classify(images: list[Image.Image], o: ClassifyOptions) -> dict:
        """The top `k` labels of each image (itc: softmax over the labels; itm: match probability of each)."""
        labels = check_texts(o.labels, "labels", limits)
        templates = check_texts(o.templates, "templates", limits) if o.templates else ["a picture of {}"]
        bad = next((t for t in templates if t.count("{}") != 1), None)
        if bad is not None:
            raise ApiError(422, f"templates: {bad!r} must contain {{}} exactly once, where the label goes", "templates")
        options = {"labels": labels, "templates": templates, "head": o.head, "k": o.k}
        key = (tuple(labels), tuple(templates), o.head, o.k)
        out = await run("classify", jobs.Job(images, options=options), key)
        return {"head": o.head, "results": [{"image": i, "top": [{"label": lab, "score": s} for lab, s in top]}
                                            for i, top in enumerate(out)]}

    @post("/api/ground", GroundOptions, (1, 1), "a box per phrase (GradCAM over the ITM encoder)")
    async def ground(images: list[Image.Image], o: GroundOptions) -> dict:
        """Boxes [x1, y1, x2, y2] normalised to [0, 1] (x right, y down), with the match probability of each phrase."""
        phrases = check_texts(o.phrases, "phrases", limits)
        options = {"layer": o.layer, "threshold": o.threshold, "source": o.source}
        found = await run("ground", jobs.Job(images, phrases, options), batch=False)
        picture = None
        if o.picture:
            from ..tasks.grounding import render_grounding

            picture = await run_in_threadpool(lambda: png_data_url(render_grounding(found, images[0])))
        width, height = images[0].size
        return {"width": width, "height": height, "results": [g.to_dict(maps=o.maps) for g in found],
                "picture": picture}

    @post("/api/attention", AttentionOptions, (1, 1), "cross-attention maps per token")
    async def attention(images: list[Image.Image], o: AttentionOptions) -> dict:
        """Each token's cross-attention over the image patches (`heat`: tokens x grid_h x grid_w, heads averaged)."""
        texts = check_texts([o.text], "text", limits) if o.text is not None else []
        options = {"layer": o.layer, "suppress_common": o.suppress_common}
        maps = await run("attention", jobs.Job(images, texts, options), batch=False)
        picture = None
        if o.picture:
            from ..tasks.attention import render_attention

            picture = await run_in_threadpool(lambda: png_data_url(render_attention(maps, images[0])))
        heat = maps.mean_heads().tolist() if o.maps else None
        return {**maps.to_dict(maps=False), "heat": heat, "picture": picture}

    @post("/api/search", SearchOptions, (0, 1), "search the served index by text or image")
    async def search(images: list[Image.Image], o: SearchOptions) -> dict:
        """The `k` best images of the index: by text (ITC, then ITM re-ranking) or by image (ITC)."""
        if index is None:
            raise ApiError(404, "no index is served: start the server with --db DIR")
        if (o.text is None) == (not images):
            raise ApiError(422, "send either a text or one image to search with", "text")
        if o.text is not None:
            text = check_texts([o.text], "text", limits)[0]
            call = partial(index.search_text, text, k=o.k, rerank=o.rerank)
        else:
            call = partial(index.search_image, images[0], k=o.k)
        hits = await batcher.submit("search", None, lambda _: [call()], batch=False, arrived=ARRIVED.get())
        if o.thumbnails:
            urls = await run_in_threadpool(lambda: [thumbnail_data_url(h["path"]) if h.get("path") else None
                                                    for h in hits])
            hits = [{**h, "thumbnail": u} for h, u in zip(hits, urls, strict=True)]
        return {"query": "text" if o.text is not None else "image", "results": hits}

    @app.get("/api/models", tags=["server"], summary="the served model, what it can do, and the known models")
    async def models() -> dict:
        from .. import list_models

        return {"model": {"name": model.name_or_path, "family": model.family, "capabilities": can},
                "search": index is not None, "available": list_models(), "limits": asdict(limits),
                "batching": {"max_batch": max_batch, "max_wait_ms": max_wait_ms, "gather": gather,
                             "model_process": child is not None}}

    @app.get("/api/health", tags=["server"], summary="liveness")
    async def health() -> dict:
        return {"status": "ok", "model": model.name_or_path}

    @app.get("/metrics", tags=["server"], summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        return FileResponse(STATIC / "docs.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Guard, max_body_bytes=limits.max_body_bytes, api_key=api_key, open_paths=OPEN_PATHS)
    paths = {r.path for r in app.routes if hasattr(r, "path")}
    app.add_middleware(_timing, metrics=metrics, paths=paths)  # outermost: counts refusals too
    return app

