"""Image bombs against a spawned `cgil serve` (issue 11, item 4): small bodies that declare huge images.

The server's peak memory is the kernel's high-water mark of its resident set (/proc/PID/status VmHWM),
its decode times come from its own /metrics histogram.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from test_serve import digit_png, post_image, running_server
from test_update import ROOT


def png(width: int, height: int, bit_depth: int, color_type: int) -> bytes:
    """A valid PNG of zeros, written row by row: a few hundred KB that decode to hundreds of MB."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = b"\0" * (1 + width * channels * bit_depth // 8)
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):  # the kernel's high-water mark of the resident set
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


BOMBS = {  # what an attacker sends, and what the server must answer
    "issue 11's 16-bit 6324x6324 PNG": ((6324, 6324, 16, 0), 400),
    "16-bit RGBA 2896x2896 (64 MB of decoder output)": ((2896, 2896, 16, 6), 400),
    "16-bit RGBA 2048x2048 (32 MB: the most allowed)": ((2048, 2048, 16, 6), 200),
    "8-bit RGBA 2896x2896 (32 MB: the most allowed)": ((2896, 2896, 8, 6), 200),
    "16-bit gray 2896x2896": ((2896, 2896, 16, 0), 200),
    "8-bit RGB 4096x2048 (an 8-megapixel picture)": ((4096, 2048, 8, 2), 200),
}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_image_bombs_keep_the_server_under_600_mb_and_2_cpu_s_of_decode(bundle, new_digits):
    import concurrent.futures
    import os
    import time

    from benchmarks.serve import free_port, wait_ready

    bombs = {name: (png(*shape), status) for name, (shape, status) in BOMBS.items()}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", str(bundle), "--port", str(port), "--backend",
                             "onnxruntime", "--watch", "0", "--log-level", "warning"], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_ready(url, timeout=60, proc=proc)
        idle = peak_rss_mb(proc.pid)
        with httpx.Client(base_url=url, timeout=120) as c, concurrent.futures.ThreadPoolExecutor(8) as pool:
            for name, (data, status) in bombs.items():
                assert len(data) < 2_000_000, name  # small bodies: the limits must come from the header
                t0 = time.perf_counter()
                answers = list(pool.map(lambda _: post_image(c, data), range(8)))  # 8 at once
                wall = time.perf_counter() - t0
                assert [r.status_code for r in answers] == [status] * 8, (name, answers[0].text)
                print(f"{name}: 8 concurrent in {wall:.2f}s, peak RSS so far {peak_rss_mb(proc.pid):.0f} MB")
            # mixed: all kinds at once, plus an ordinary digit that must still be answered
            mixed = [data for data, _ in bombs.values()] * 2 + [digit_png(new_digits)]
            answers = list(pool.map(lambda d: post_image(c, d), mixed))
            assert answers[-1].status_code == 200
            metrics = c.get("/metrics").text
        peak = peak_rss_mb(proc.pid)
        print(f"idle {idle:.0f} MB, peak {peak:.0f} MB")
        assert peak <= 600, f"peak server memory {peak:.0f} MB (idle {idle:.0f} MB)"
        buckets = {line.split('le="')[1].split('"')[0]: float(line.split()[-1])
                   for line in metrics.splitlines() if line.startswith("cgil_decode_seconds_bucket")}
        assert buckets["+Inf"] > 0 and buckets["2"] == buckets["+Inf"], buckets  # no image took 2 CPU s to decode
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_formats_that_shell_out_are_refused(bundle):
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with running_server(bundle, watch_interval_s=0) as url, httpx.Client(base_url=url) as c:
        r = post_image(c, eps)
        assert r.status_code == 400 and "not an accepted image format" in r.json()["error"]
        r = post_image(c, png(2500, 2500, 8, 2) + b"")  # ok alone...
        assert r.status_code == 200
    with running_server(bundle, watch_interval_s=0, max_request_pixels=10_000_000) as url, \
            httpx.Client(base_url=url) as c:  # ...but a request's images share one pixel budget
        files = [("images", (f"{i}.png", png(2500, 2500, 8, 2), "image/png")) for i in range(2)]
        r = c.post("/v1/classify", files=files)
        assert r.status_code == 413 and "per request" in r.json()["error"]
