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
import collections
import hmac
import io
import ipaddress
import logging
import math
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from fastapi import Query, Request
from pydantic import BaseModel

from cgil.errors import CgilError

from .bundle import Head

log = logging.getLogger("cgil.serve")

ADMIN_TOKEN_ENV = "CGIL_ADMIN_TOKEN"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PATHS = ("/v1/classify", "/v1/classes", "/healthz", "/readyz", "/metrics", "/v1/admin/reload", "/openapi.json", "/docs")


@dataclass
class ServeConfig:
    bundle: Path
    backend: str = "auto"
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256  # images waiting for the engine
    max_body_bytes: int = 16 * 1024 * 1024
    max_images_per_request: int = 64
    max_pixels: int = 40_000_000  # per decoded image (a small compressed body can hold a huge image)
    admin_token: Optional[str] = None
    admin_loopback: bool = True  # loopback peers may reload without the token
    watch_interval_s: float = 0.25  # 0: no file watch (admin reload only)
    threads: int = 0  # ONNX Runtime intra-op threads (0: its default)

    def check(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.max_wait_ms < 0 or self.max_body_bytes < 1:
            raise CgilError("--max-batch and --max-queue must be >= 1, --max-wait-ms >= 0")


class QueueFull(Exception):
    pass


# ---------------------------------------------------------------- metrics (Prometheus text format)

class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += v
        self.n += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, acc = [], 0
        sep = "," if labels else ""
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {acc}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}')
        lab = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{lab} {self.sum:.6f}", f"{name}_count{lab} {self.n}"]
        return out


class Metrics:
    def __init__(self, max_batch: int):
        self.lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # (path, status) -> n
        self.errors: collections.Counter = collections.Counter()  # kind -> n
        self.latency = Histogram(LATENCY_BUCKETS)
        sizes = tuple(sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max_batch}))
        self.batch_sizes = Histogram(tuple(float(s) for s in sizes))
        self.images = 0
        self.swaps = 0

    def request(self, path: str, status: int, seconds: float) -> None:
        path = path if path in PATHS else "other"  # bounded label values
        with self.lock:
            self.requests[(path, status)] += 1
            if path == "/v1/classify":
                self.latency.observe(seconds)
            if status >= 400:
                self.errors[str(status)] += 1

    def batch(self, n: int) -> None:
        with self.lock:
            self.batch_sizes.observe(n)
            self.images += n

    def render(self, queue_depth: int, head_version: int, ready: bool) -> str:
        with self.lock:
            lines = ["# HELP cgil_requests_total HTTP requests by path and status.", "# TYPE cgil_requests_total counter"]
            for (path, status), n in sorted(self.requests.items()):
                lines.append(f'cgil_requests_total{{path="{path}",status="{status}"}} {n}')
            lines += ["# HELP cgil_errors_total Responses with status >= 400, by status.", "# TYPE cgil_errors_total counter"]
            for kind, n in sorted(self.errors.items()):
                lines.append(f'cgil_errors_total{{status="{kind}"}} {n}')
            lines += ["# HELP cgil_request_latency_seconds Latency of /v1/classify.",
                      "# TYPE cgil_request_latency_seconds histogram"]
            lines += self.latency.lines("cgil_request_latency_seconds")
            lines += ["# HELP cgil_batch_size Images per engine call.", "# TYPE cgil_batch_size histogram"]
            lines += self.batch_sizes.lines("cgil_batch_size")
            lines += ["# HELP cgil_images_total Images classified.", "# TYPE cgil_images_total counter",
                      f"cgil_images_total {self.images}",
                      "# HELP cgil_queue_depth Images waiting for the engine.", "# TYPE cgil_queue_depth gauge",
                      f"cgil_queue_depth {queue_depth}",
                      "# HELP cgil_head_version Version of the head now serving.", "# TYPE cgil_head_version gauge",
                      f"cgil_head_version {head_version}",
                      "# HELP cgil_head_swaps_total Head hot swaps since start.", "# TYPE cgil_head_swaps_total counter",
                      f"cgil_head_swaps_total {self.swaps}",
                      "# HELP cgil_ready 1 when the engine is loaded.", "# TYPE cgil_ready gauge",
                      f"cgil_ready {int(ready)}"]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- scoring and the batcher

def score(head: Head, embeddings: np.ndarray, top_k: int, logit_scale: float) -> list[dict[str, Any]]:
    """Top-k labels and softmax scores per embedding, against ONE head (the same maths as Classifier.classify)."""
    if head.num_classes == 0:
        raise CgilError(f"the head in {head.directory} has no classes")
    sims = embeddings @ head.keys.T
    logits = logit_scale * sims
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    k = max(1, min(int(top_k), head.num_classes))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [{"labels": [head.class_names[j] for j in row], "scores": [float(probs[i, j]) for j in row]}
            for i, row in enumerate(order)]


@dataclass
class Job:
    pixels: np.ndarray  # (n, H, W, 3) uint8
    top_k: int
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """A bounded queue of jobs and one worker thread that runs them through the engine in batches."""

    def __init__(self, classifier, max_batch: int, max_wait_ms: float, max_queue: int, metrics: Metrics):
        self.classifier = classifier
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self.metrics = metrics
        self.jobs: collections.deque[Job] = collections.deque()
        self.depth = 0  # images queued
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="cgil-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout=10)

    def submit(self, pixels: np.ndarray, top_k: int) -> Future:
        job = Job(pixels, top_k)
        with self.cond:
            if self.stopping:
                raise QueueFull("server shutting down")
            if self.depth + len(pixels) > self.max_queue:
                raise QueueFull(f"queue full ({self.depth} of {self.max_queue} images waiting)")
            self.jobs.append(job)
            self.depth += len(pixels)
            self.cond.notify()
        return job

    def _take(self) -> list[Job]:
        with self.cond:
            while not self.jobs and not self.stopping:
                self.cond.wait()
            if not self.jobs:
                return []
            batch = [self.jobs.popleft()]
            n = len(batch[0].pixels)
            deadline = batch[0].enqueued + self.max_wait
            while n < self.max_batch:
                if self.jobs:
                    if n + len(self.jobs[0].pixels) > self.max_batch:
                        break
                    job = self.jobs.popleft()
                    batch.append(job)
                    n += len(job.pixels)
                    continue
                left = deadline - time.perf_counter()
                if left <= 0 or self.stopping:
                    break
                self.cond.wait(left)
            self.depth -= n
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            try:
                pixels = batch[0].pixels if len(batch) == 1 else np.concatenate([j.pixels for j in batch])
                emb = self.classifier.embed_pixels(pixels, batch_size=max(self.max_batch, len(pixels)))
                head = self.classifier.head  # one snapshot scores the whole batch
                self.metrics.batch(len(pixels))
                start = 0
                for job in batch:
                    n = len(job.pixels)
                    job.future.set_result((head.version, score(head, emb[start:start + n], job.top_k,
                                                               self.classifier.logit_scale)))
                    start += n
            except BaseException as e:  # the engine failed: fail this batch's requests, keep serving
                log.exception("engine call failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)


# ---------------------------------------------------------------- head watching and reload

class HeadManager:
    """Follows heads/CURRENT; every swap is verified before it happens and is one reference assignment."""

    def __init__(self, classifier, metrics: Metrics, interval_s: float):
        self.classifier, self.metrics, self.interval = classifier, metrics, interval_s
        self.pointer = Path(classifier.bundle) / "heads" / "CURRENT"
        self.seen = self._pointer()
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="cgil-head-watch", daemon=True)
        self.last_error: Optional[str] = None

    def _pointer(self) -> Optional[str]:
        try:
            return self.pointer.read_text().strip()
        except OSError:
            return None

    def start(self) -> None:
        if self.interval > 0:
            self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)

    def reload(self, force: bool = False) -> dict[str, Any]:
        with self.lock:
            previous = self.classifier.head.version
            name = self._pointer()
            if not force and name == self.seen:
                return {"version": previous, "previous": previous, "swapped": False}
            try:
                head = self.classifier.load_head()
            except CgilError as e:
                self.last_error = str(e)
                log.error("head reload refused, still serving v%s: %s", previous, e)
                raise
            self.seen = name
            self.last_error = None
            swapped = head.version != previous
            if swapped:
                with self.metrics.lock:
                    self.metrics.swaps += 1
                log.info("head swapped: v%s -> v%s (%s)", previous, head.version, name)
            return {"version": head.version, "previous": previous, "swapped": swapped, "directory": name}

    def _watch(self) -> None:
        while not self.stop_event.wait(self.interval):
            if self._pointer() != self.seen:
                try:
                    self.reload()
                except CgilError:  # logged; tried again only when the pointer moves again
                    self.seen = self._pointer()


# ---------------------------------------------------------------- the app

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



def is_loopback(host: Optional[str]) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def decode_image(data: bytes, preprocess, what: str, max_pixels: int = 40_000_000) -> np.ndarray:
    from PIL import Image

    if not data:
        raise CgilError(f"{what}: empty image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:  # checked from the header, before decoding
                raise CgilError(f"{img.width}x{img.height} pixels is over the limit of {max_pixels}")
            img.load()
            return preprocess.pixels(img.copy())
    except CgilError as e:
        raise CgilError(f"{what}: {e}") from e
    except Exception as e:  # PIL raises many types for malformed files (UnidentifiedImageError, OSError, SyntaxError...)
        from PIL import UnidentifiedImageError

        why = "not a recognised image format" if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
        raise CgilError(f"{what}: cannot decode image ({why}, {len(data)} bytes)") from e


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
            request._body = body  # parse the already bounded body
            try:
                form = await request.form(max_files=cfg.max_images_per_request, max_fields=cfg.max_images_per_request)
            except Exception as e:
                detail = str(getattr(e, "detail", e))
                if detail.startswith("Too many"):
                    return error(413, f"{detail}: at most {cfg.max_images_per_request} images per request")
                return error(400, f"malformed multipart body: {detail}")
            parts = [(f"images[{i}] ({getattr(v, 'filename', None) or 'unnamed'})", await v.read())
                     for i, (k, v) in enumerate(form.multi_items()) if hasattr(v, "read")]
            await form.close()
        else:
            parts = [("body", body)]
        if not parts:
            return error(400, "no image in the request (send a raw image body or multipart field `images`)")
        if len(parts) > cfg.max_images_per_request:
            return error(413, f"{len(parts)} images in one request; at most {cfg.max_images_per_request}")
        if len(parts) > cfg.max_queue:
            return error(413, f"{len(parts)} images exceed the queue size {cfg.max_queue}")
        pre = classifier.preprocess

        def decode() -> np.ndarray:
            return np.stack([decode_image(data, pre, what, cfg.max_pixels) for what, data in parts])

        try:
            pixels = await run_in_threadpool(decode)
        except CgilError as e:
            return error(400, str(e))
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
    def healthz():
        return {"status": "alive"}

    @app.get("/readyz")
    def readyz():
        if not state["ready"]:
            return error(503, "engine not loaded yet")
        return {"status": "ready", "head_version": classifier.head.version, "backend": classifier.backend.name}

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus():
        return PlainTextResponse(metrics.render(batcher.depth, classifier.head.version, state["ready"]),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/v1/admin/reload", response_model=ReloadResponse,
              responses={403: {"description": "not loopback and no valid token"},
                         409: {"description": "the new head failed verification; the old one keeps serving"}})
    async def reload(request: Request):
        """Re-read heads/CURRENT and swap the head. Loopback peers, or `Authorization: Bearer <token>`."""
        given = request.headers.get("authorization", "")
        given = given[7:] if given.lower().startswith("bearer ") else request.headers.get("x-admin-token", "")
        peer = request.client.host if request.client else None
        authorised = (token is not None and bool(given) and hmac.compare_digest(given.encode(), token.encode())) or \
            (cfg.admin_loopback and is_loopback(peer))
        if not authorised:
            return error(403, "admin endpoints need a loopback peer or a valid admin token")
        try:
            return await run_in_threadpool(heads.reload, True)
        except CgilError as e:
            return error(409, f"reload refused, still serving v{classifier.head.version}: {e}")

    return app


# ---------------------------------------------------------------- running it

def make_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning"):
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            proxy_headers=True, forwarded_allow_ips="127.0.0.1,::1", timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(asctime)s %(name)s %(message)s")
    app = create_app(cfg)
    make_server(app, host, port, log_level).run()


def percentile(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100.0 * (len(v) - 1))))]
