"""Prometheus text metrics of `cgil serve`: request counts and latency, batch sizes, queue depth, head version."""
from __future__ import annotations

import collections
import threading

# Label values of the request counters: these paths, everything else is "other" (bounded cardinality).
PATHS = ("/v1/classify", "/v1/classes", "/healthz", "/readyz", "/metrics", "/v1/admin/reload", "/openapi.json", "/docs")
DECODE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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
        self.decode = Histogram(DECODE_BUCKETS)
        self.images = 0
        self.swaps = 0
        self.reload_failures = 0
        self.watch_error: str | None = None  # set while the head watcher cannot follow heads/CURRENT

    def request(self, path: str, status: int, seconds: float) -> None:
        path = path if path in PATHS else "other"  # bounded label values
        with self.lock:
            self.requests[(path, status)] += 1
            if path == "/v1/classify":
                self.latency.observe(seconds)
            if status >= 400:
                self.errors[str(status)] += 1

    def decoded(self, seconds: float) -> None:
        with self.lock:
            self.decode.observe(seconds)

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
            lines += ["# HELP cgil_decode_seconds CPU seconds to decode and preprocess one image.",
                      "# TYPE cgil_decode_seconds histogram"]
            lines += self.decode.lines("cgil_decode_seconds")
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
                      "# HELP cgil_head_reload_failures_total Head reloads refused (bad pointer or head).",
                      "# TYPE cgil_head_reload_failures_total counter",
                      f"cgil_head_reload_failures_total {self.reload_failures}",
                      "# HELP cgil_head_watch_failing 1 while heads/CURRENT cannot be followed (the old head serves).",
                      "# TYPE cgil_head_watch_failing gauge",
                      f"cgil_head_watch_failing {int(self.watch_error is not None)}",
                      "# HELP cgil_ready 1 when the engine is loaded.", "# TYPE cgil_ready gauge",
                      f"cgil_ready {int(ready)}"]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- scoring and the batcher
