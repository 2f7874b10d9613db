"""The two worker threads behind `cgil serve`: dynamic batching of engine calls, and head hot swap.

Batcher: requests put pixels on a bounded queue and wait on a future; one thread takes everything queued
up to max_batch images or until the oldest has waited max_wait_ms, runs ONE engine call and scores the
batch with ONE head snapshot. HeadManager: polls heads/CURRENT (or is told to reload), verifies the new
head off the request path and swaps it in with one reference assignment.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .errors import CgilError

from .metrics import Metrics

log = logging.getLogger("cgil.serve")


class QueueFull(Exception):
    pass


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
                    found = self.classifier.classify(emb[start:start + n], job.top_k, head=head)
                    job.future.set_result((head.version, [{"labels": p.labels, "scores": p.scores} for p in found]))
                    start += n
            except BaseException as e:  # the engine failed: fail this batch's requests, keep serving
                log.exception("engine call failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)


# ---------------------------------------------------------------- head watching and reload

class HeadManager:
    """Follows heads/CURRENT; every swap is verified before it happens and is one reference assignment.

    Nothing read from the bundle can stop the watcher: an unreadable or invalid pointer, or a head that
    fails verification or sanity, is refused (409 on the admin call), the old head keeps serving, the
    failure shows in /readyz and /metrics, and the watcher tries again when the pointer changes (and
    every `retry_s` while failing), so fixing the bundle is enough to recover.
    """

    def __init__(self, classifier, metrics: Metrics, interval_s: float, retry_s: float = 5.0):
        self.classifier, self.metrics, self.interval, self.retry = classifier, metrics, interval_s, retry_s
        self.pointer = Path(classifier.bundle) / "heads" / "CURRENT"
        self.seen = self._pointer()
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="cgil-head-watch", daemon=True)
        self.last_error: Optional[str] = None
        self.last_attempt = 0.0

    def _pointer(self) -> Optional[bytes]:
        """The pointer's raw bytes: compared, never decoded here (a non-UTF-8 pointer is an error of the reload)."""
        try:
            return self.pointer.read_bytes()
        except OSError:
            return None

    @property
    def watching(self) -> bool:
        return self.interval <= 0 or self.thread.is_alive()

    def start(self) -> None:
        if self.interval > 0:
            self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)

    def _failed(self, message: str) -> bool:
        """Record a refused head; True when it is news (a new failure, not the retry of a logged one)."""
        news = message != self.last_error
        self.last_error = message
        with self.metrics.lock:
            self.metrics.reload_failures += 1
            self.metrics.watch_error = message
        return news

    def reload(self, force: bool = False) -> dict[str, Any]:
        with self.lock:
            previous = self.classifier.head.version
            name = self._pointer()
            if not force and name == self.seen and self.last_error is None:
                return {"version": previous, "previous": previous, "swapped": False}
            changed = name != self.seen
            self.seen, self.last_attempt = name, time.monotonic()
            try:
                head = self.classifier.load_head()
            # Logged once per failure: the retry every `retry_s` of an unchanged broken head logs at
            # debug level only (it still counts in /metrics), or the log would repeat it every 5 s.
            except CgilError as e:
                level = logging.ERROR if self._failed(str(e)) or changed else logging.DEBUG
                log.log(level, "head reload refused, still serving v%s: %s", previous, e)
                raise
            except Exception as e:  # whatever a damaged bundle raises is a refused head, never a dead watcher
                level = logging.ERROR if self._failed(f"{type(e).__name__}: {e}") or changed else logging.DEBUG
                log.log(level, "head reload failed, still serving v%s: %s: %s", previous, type(e).__name__, e)
                raise CgilError(self.last_error) from e
            self.last_error = None
            with self.metrics.lock:
                self.metrics.watch_error = None
            swapped = head.version != previous
            if swapped:
                with self.metrics.lock:
                    self.metrics.swaps += 1
                log.info("head swapped: v%s -> v%s", previous, head.version)
            return {"version": head.version, "previous": previous, "swapped": swapped,
                    "directory": head.directory.name if head.directory else None}

    def _watch(self) -> None:
        while not self.stop_event.wait(self.interval):
            retry = self.last_error is not None and time.monotonic() - self.last_attempt >= self.retry
            if self._pointer() != self.seen or retry:
                try:
                    self.reload(force=retry)
                except Exception:  # logged and counted by reload; the watcher goes on
                    pass


# ---------------------------------------------------------------- the app
