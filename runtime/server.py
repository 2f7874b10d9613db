"""`cgil serve`: an HTTP classification service over a bundle, with dynamic batching and head hot swap.

FastAPI + uvicorn. One engine (runtime.Classifier) and one batching worker thread: requests decode
their images in the thread pool, put their pixels on a bounded queue and await a future; the worker
takes everything queued up to --max-batch images or until the oldest request has waited
--max-wait-ms, runs ONE engine call, scores the whole batch with ONE head snapshot and resolves the
futures. Each response names the head version that scored it.

Hot swap: a watcher thread polls heads/CURRENT (and POST /v1/admin/reload forces a check); a new
head is read and sha256-verified completely off the request path, then swapped in by one reference
assignment (Classifier.load_head). Requests in flight finish with the head they started with; a
head that fails verification is refused and the old one keeps serving.

Bounded: a full queue -> 503 + Retry-After, a body over --max-body-mb -> 413, an undecodable image
-> 400 naming the part; none of these reaches the engine or affects other requests.
No torch is imported here (with the onnxruntime / tensorrt backends).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import sys
import threading
import time
from typing import Callable, Optional

import numpy as np
from fastapi import Query, Request
from pydantic import BaseModel

from .admin_auth import admin_authorised
from .errors import CgilError

from .batching import Batcher, HeadManager, QueueFull
from .metrics import Metrics
# the settings live in a module without fastapi, so that `cgil serve --help` and its defaults load fast
from .serve_config import ADMIN_TOKEN_ENV, DEFAULT_HOST, DEFAULT_PORT, MAX_DECODED_BYTES, MAX_PIXELS, ServeConfig

log = logging.getLogger("cgil.serve")


class Result(BaseModel):
    labels: list[str]
    scores: list[float]


class ClassifyResponse(BaseModel):
    head_version: int
    results: list[Result]


class ClassesResponse(BaseModel):
    head_version: int
    classes: list[str]


class ReloadResponse(BaseModel):
    version: int
    previous: int
    swapped: bool



def multipart_parts(scope: dict, body: bytes, max_parts: int) -> list[tuple[str, bytes]]:
    """The file parts of an already bounded multipart body, as (name for errors, bytes). Runs in a worker
    thread with a private event loop: Starlette's parser is async but does its work synchronously."""
    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def parse() -> list[tuple[str, bytes]]:
        form = await Request(scope, receive).form(max_files=max_parts, max_fields=max_parts)
        try:
            return [(f"images[{i}] ({getattr(v, 'filename', None) or 'unnamed'})", await v.read())
                    for i, (k, v) in enumerate(form.multi_items()) if hasattr(v, "read")]
        finally:
            await form.close()

    return asyncio.run(parse())


def decode_image(data: bytes, preprocess, what: str, max_pixels: int = MAX_PIXELS,
                 max_bytes: int = MAX_DECODED_BYTES) -> np.ndarray:
    """Untrusted bytes -> the model's uint8 pixels, within the limits of runtime.images.open_bounded."""
    from .images import open_bounded

    if not data:
        raise CgilError(f"{what}: empty image")
    try:
        img = open_bounded(data, max_pixels, max_bytes, min(preprocess.size))
        try:
            return preprocess.pixels(img)
        finally:
            img.close()
    except CgilError as e:
        raise CgilError(f"{what}: {e}") from e
    except Exception as e:  # PIL raises many types for malformed files (UnidentifiedImageError, OSError, SyntaxError...)
        from PIL import UnidentifiedImageError

        why = ("not an accepted image format (PNG, JPEG, WebP, BMP, GIF, TIFF)"
               if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}")
        raise CgilError(f"{what}: cannot decode image ({why}, {len(data)} bytes)") from e


def header_pixels(data: bytes) -> int:
    """Pixels an image declares in its header (0 if it has none we accept: decoding will say why).

    Runs in the thread pool, never on the event loop: even bounded (open_header), parsing is Python work."""
    from .images import open_header

    try:
        img, _ = open_header(data)
    except Exception:
        return 0
    with img:
        return img.width * img.height


class DecodeSlots:
    """At most `slots` images decode at once (one per core: decoding is CPU work, more threads only add
    memory); the other requests wait here, in anyio's thread pool, holding only their compressed bytes."""

    def __init__(self, slots: int):
        self.slots = max(1, slots)
        self.semaphore = threading.BoundedSemaphore(self.slots)

    def decode(self, data: bytes, preprocess, what: str, cfg: "ServeConfig", metrics) -> np.ndarray:
        with self.semaphore:
            t0 = time.thread_time()  # CPU seconds of this thread: the cost of the image, not of the machine's load
            try:
                return decode_image(data, preprocess, what, cfg.max_pixels, cfg.max_decoded_bytes)
            finally:
                metrics.decoded(time.thread_time() - t0)


def create_app(cfg: ServeConfig, classifier=None):
    """The FastAPI app. `classifier` may be given (tests wrap its engine); otherwise it is loaded from cfg.bundle."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.concurrency import run_in_threadpool

    from .classifier import Classifier

    cfg.check()
    if classifier is None:
        classifier = Classifier(cfg.bundle, backend=cfg.backend, threads=cfg.threads)
    metrics = Metrics(cfg.max_batch)
    batcher = Batcher(classifier, cfg.max_batch, cfg.max_wait_ms, cfg.max_queue, metrics)
    heads = HeadManager(classifier, metrics, cfg.watch_interval_s)
    slots = DecodeSlots(cfg.decode_slots or os.cpu_count() or 1)
    token = cfg.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        h, w = classifier.preprocess.size
        await run_in_threadpool(classifier.embed_pixels, np.zeros((1, h, w, 3), np.uint8))  # warm-up
        heads.start()
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            heads.stop()
            batcher.stop()

    app = FastAPI(title="cgil serve", version="1", lifespan=lifespan,
                  description="CLIP + CGIL classifier: a frozen image engine and a hot-swappable head of class keys.")
    app.state.classifier, app.state.batcher, app.state.heads, app.state.metrics = classifier, batcher, heads, metrics

    def error(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.middleware("http")
    async def count(request: Request, call_next):
        t0 = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            metrics.request(request.url.path, 500, time.perf_counter() - t0)
            raise
        metrics.request(request.url.path, response.status_code, time.perf_counter() - t0)
        return response

    classify_body = {
        "requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        }},
    }

    async def read_body(request: Request) -> bytes | JSONResponse:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cfg.max_body_bytes:
            return error(413, f"body of {int(length)} bytes is over the limit of {cfg.max_body_bytes}")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > cfg.max_body_bytes:
                return error(413, f"body over the limit of {cfg.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.post("/v1/classify", response_model=ClassifyResponse, openapi_extra=classify_body,
              responses={400: {"description": "undecodable image"}, 413: {"description": "body too large"},
                         503: {"description": "queue full (see Retry-After)"}})
    async def classify(request: Request, top_k: int = Query(5, ge=1, le=1000)):
        """Classify one image (raw body) or several (multipart field `images`); top-k labels per image."""
        body = await read_body(request)
        if isinstance(body, JSONResponse):
            return body
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            try:  # off the event loop: splitting 16 MB of parts held /healthz for a quarter second
                parts = await run_in_threadpool(multipart_parts, request.scope, body, cfg.max_images_per_request)
            except Exception as e:
                detail = str(getattr(e, "detail", e))
                if detail.startswith("Too many"):
                    return error(413, f"{detail}: at most {cfg.max_images_per_request} images per request")
                return error(400, f"malformed multipart body: {detail}")
        else:
            parts = [("body", body)]
        if not parts:
            return error(400, "no image in the request (send a raw image body or multipart field `images`)")
        if len(parts) > cfg.max_images_per_request:
            return error(413, f"{len(parts)} images in one request; at most {cfg.max_images_per_request}")
        if len(parts) > cfg.max_queue:
            return error(413, f"{len(parts)} images exceed the queue size {cfg.max_queue}")
        pre = classifier.preprocess

        def decode() -> np.ndarray | int:
            """The request's pixels, or (multi-image) the pixels its headers declare in all when over the limit."""
            declared = sum(header_pixels(data) for _, data in parts) if len(parts) > 1 else 0  # one: its own limit
            if declared > cfg.max_request_pixels:
                return declared
            return np.stack([slots.decode(data, pre, what, cfg, metrics) for what, data in parts])

        try:
            pixels = await run_in_threadpool(decode)
        except CgilError as e:
            return error(400, str(e))
        if isinstance(pixels, int):
            return error(413, f"the images of this request declare {pixels} pixels in all; "
                              f"at most {cfg.max_request_pixels} per request")
        try:
            job = batcher.submit(pixels, top_k)
        except QueueFull as e:
            return error(503, str(e), {"Retry-After": "1"})
        try:
            version, results = await asyncio.wrap_future(job.future)
        except Exception as e:
            return error(500, f"engine error: {e}")
        return {"head_version": version, "results": results}

    @app.get("/v1/classes", response_model=ClassesResponse)
    def classes():
        head = classifier.head
        return {"head_version": head.version, "classes": list(head.class_names)}

    @app.get("/healthz")
    async def healthz():  # on the loop itself: no wait for a worker thread behind image jobs
        return {"status": "alive"}

    @app.get("/readyz")
    def readyz():
        if not state["ready"]:
            return error(503, "engine not loaded yet")
        if not heads.watching:
            return error(503, "the head watcher has stopped: updates of heads/CURRENT are not followed")
        body = {"status": "ready", "head_version": classifier.head.version, "backend": classifier.backend.name,
                "head_watch": {"ok": heads.last_error is None, "error": heads.last_error}}
        if heads.last_error is not None:  # still answering with the old head, but not following the bundle
            body["status"] = "degraded"
        return body

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus():
        return PlainTextResponse(metrics.render(batcher.depth, classifier.head.version, state["ready"]),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/v1/admin/reload", response_model=ReloadResponse,
              responses={403: {"description": "not loopback and no valid token"},
                         409: {"description": "the new head failed verification; the old one keeps serving"}})
    async def reload(request: Request):
        """Re-read heads/CURRENT and swap the head. Loopback peers, or `Authorization: Bearer <token>`."""
        if not admin_authorised(request, token, cfg.admin_loopback):
            return error(403, "admin endpoints need a valid admin token, or a direct (not proxied) loopback peer "
                              "without a token")
        try:
            return await run_in_threadpool(heads.reload, True)
        except CgilError as e:
            return error(409, f"reload refused, still serving v{classifier.head.version}: {e}")

    return app


# ---------------------------------------------------------------- running it

def make_server(app, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log_level: str = "warning",
                forwarded_allow_ips: Optional[str] = None, on_ready: Optional[Callable[[], None]] = None):
    """uvicorn reads X-Forwarded-For only from the proxies named in `forwarded_allow_ips` (none by default).

    `on_ready` runs once the app has started (model loaded and warmed up) and the socket listens."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started and on_ready is not None:
                on_ready()

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            proxy_headers=bool(forwarded_allow_ips), forwarded_allow_ips=forwarded_allow_ips or "",
                            timeout_graceful_shutdown=5)
    return Server(config)


def listen(host: str, port: int) -> socket.socket:
    """The server's socket: a busy port or a wrong host is one line (uvicorn would log it and exit 1)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise CgilError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    return sock


def return_freed_memory() -> None:
    """glibc only: serve every allocation of 1 MB or more with its own mmap, returned to the system when freed.

    Decoded images are tens of MB, allocated and freed by anyio's many worker threads; with glibc's
    default (a threshold that grows up to 32 MB and one heap per thread) they stay in the process
    after the request, and peak memory grows with the number of threads that ever decoded.
    """
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixed: no dynamic growth)


def serve(cfg: ServeConfig, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log_level: str = "info",
          on_ready: Optional[Callable[[str], None]] = None) -> None:
    """Load the bundle, bind, warm up, then listen; `on_ready(url)` runs only then (a "serving on" line that
    is true). The bundle is read first, so that a wrong one is named whatever the port."""
    return_freed_memory()
    sys.setswitchinterval(0.001)  # the event loop gets the GIL back within 1 ms, not 5, of busy decode threads
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(asctime)s %(name)s %(message)s")
    app = create_app(cfg)
    sock = listen(host, port)
    url = f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}"
    try:
        ready = (lambda: on_ready(url)) if on_ready is not None else None
        make_server(app, host, port, log_level, cfg.forwarded_allow_ips, ready).run(sockets=[sock])
    finally:
        sock.close()


def percentile(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100.0 * (len(v) - 1))))]
