"""`cgil serve`: a real uvicorn server on 127.0.0.1 (free port), a real httpx client, real ONNX Runtime.

Load with a hot swap in the middle, bounded queue / body, undecodable images, admin auth, the
OpenAPI schema, and no torch on the serving path.
"""
from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def running_server(bundle_dir: Path, classifier=None, **options) -> Iterator[str]:
    """`cgil serve` in a thread of this process: uvicorn on 127.0.0.1 and a free port; yields its URL."""
    from benchmarks.serve import free_port
    from runtime.server import ServeConfig, create_app, make_server

    options.setdefault("watch_interval_s", 0.05)
    app = create_app(ServeConfig(bundle_dir, backend="onnxruntime", **options), classifier)
    port = free_port()
    server = make_server(app, "127.0.0.1", port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def digit_png(new_digits, name: str = "nine", i: int = 0) -> bytes:
    return sorted((new_digits / name).glob("*.png"))[i].read_bytes()


def post_image(client: httpx.Client, data: bytes, **kw) -> httpx.Response:
    return client.post("/v1/classify", content=data, headers={"content-type": "image/png"}, **kw)


def test_endpoints_openapi_and_predictions_equal_the_classifier(bundle, new_digits):
    from runtime import Classifier

    files = sorted((new_digits / "eight").glob("*.png"))[:5]
    expected = Classifier(bundle, backend="onnxruntime").predict(files, top_k=3)
    with running_server(bundle) as url, httpx.Client(base_url=url) as c:
        schema = c.get("/openapi.json").json()
        assert {"/v1/classify", "/v1/classes", "/healthz", "/readyz", "/metrics", "/v1/admin/reload"} <= set(schema["paths"])
        assert "multipart/form-data" in schema["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").json()["status"] == "ready"
        classes = c.get("/v1/classes").json()
        assert len(classes["classes"]) == 8 and classes["head_version"] == 4
        r = c.post("/v1/classify?top_k=3", files=[("images", (f.name, f.read_bytes(), "image/png")) for f in files])
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["head_version"] == 4 and len(body["results"]) == 5
        for got, want in zip(body["results"], expected):
            assert got["labels"] == want.labels and np.allclose(got["scores"], want.scores, atol=1e-5)
        one = post_image(c, files[0].read_bytes()).json()  # raw body, default top_k 5
        assert one["results"][0]["labels"][:3] == expected[0].labels
        metrics = c.get("/metrics").text
        for name in ("cgil_requests_total", "cgil_errors_total", "cgil_request_latency_seconds_bucket",
                     "cgil_batch_size_bucket", "cgil_queue_depth", "cgil_head_version 4"):
            assert name in metrics


def test_8_threads_x_50_requests_with_hot_swaps_zero_failures(bundle, new_digits):
    from runtime.heads import add_zero_shot, rollback
    from runtime.bundle import load_head

    existed = {load_head(bundle).version}
    png = digit_png(new_digits)
    results: list[tuple[int, int]] = []
    lock = threading.Lock()
    start = threading.Barrier(9)

    def worker() -> None:
        mine = []
        with httpx.Client(base_url=url, timeout=30) as c:
            start.wait()
            for _ in range(50):
                r = post_image(c, png)
                mine.append((r.status_code, r.json().get("head_version", -1) if r.status_code == 200 else -1))
        with lock:
            results.extend(mine)

    with running_server(bundle, max_batch=16, max_wait_ms=2) as url:
        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        start.wait()
        swaps = 0
        while any(t.is_alive() for t in threads) and swaps < 6:  # publish while the load runs
            time.sleep(0.05)
            if swaps % 2 == 0:
                existed.add(add_zero_shot(bundle, [f"extra {swaps}"])["version"])
            else:
                rollback(bundle)
            swaps += 1
        for t in threads:
            t.join()
        with httpx.Client(base_url=url) as c:
            time.sleep(0.2)
            final = c.get("/v1/classes").json()
            metrics = c.get("/metrics").text
    assert len(results) == 400
    assert [s for s, _ in results if s != 200] == []
    seen = {v for _, v in results}
    assert seen <= existed, (seen, existed)
    assert swaps >= 2 and len(seen) >= 2, (swaps, seen)  # the swap really happened under load
    assert final["head_version"] == load_head(bundle).version
    assert 'cgil_requests_total{path="/v1/classify",status="200"} 400' in metrics


def test_concurrent_requests_are_batched(bundle, new_digits):
    png = digit_png(new_digits)
    with running_server(bundle, max_batch=8, max_wait_ms=300) as url:
        barrier = threading.Barrier(8)
        codes = []

        def one() -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                barrier.wait()
                codes.append(post_image(c, png).status_code)

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = httpx.get(url + "/metrics").text
    assert codes == [200] * 8
    calls = int(next(l for l in metrics.splitlines() if l.startswith("cgil_batch_size_count")).split()[-1])
    assert calls < 8  # 8 concurrent single-image requests shared engine calls


def test_bad_inputs_get_400_and_413_without_affecting_other_requests(bundle, new_digits):
    png = digit_png(new_digits)
    good_codes: list[int] = []

    import io

    from PIL import Image

    huge = io.BytesIO()
    Image.new("L", (1100, 1000)).save(huge, "PNG")  # a few kB that would decode to 1.1 M pixels
    with running_server(bundle, max_body_bytes=64 * 1024, max_images_per_request=4, max_pixels=1_000_000) as url:
        def good() -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                for _ in range(20):
                    good_codes.append(post_image(c, png).status_code)

        threads = [threading.Thread(target=good) for _ in range(3)]
        for t in threads:
            t.start()
        with httpx.Client(base_url=url, timeout=30) as c:
            r = post_image(c, b"\x00garbage bytes, not an image" * 10)
            assert r.status_code == 400 and "cannot decode image" in r.json()["error"]
            assert post_image(c, png[: len(png) // 2]).status_code == 400  # truncated PNG
            assert c.post("/v1/classify", content=b"").status_code == 400
            r = post_image(c, huge.getvalue())
            assert r.status_code == 400 and "over the limit of 1000000" in r.json()["error"]
            r = c.post("/v1/classify", files=[("images", ("a.png", png, "image/png")), ("images", ("b.png", b"junk", "image/png"))])
            assert r.status_code == 400 and "b.png" in r.json()["error"]
            r = post_image(c, b"\x89PNG" + bytes(100 * 1024))
            assert r.status_code == 413 and "limit" in r.json()["error"]

            def chunks():  # no Content-Length: the streamed body is counted
                for _ in range(20):
                    yield bytes(8 * 1024)

            assert c.post("/v1/classify", content=chunks()).status_code == 413
            many = [("images", (f"{i}.png", png, "image/png")) for i in range(5)]
            assert c.post("/v1/classify", files=many).status_code == 413
            assert post_image(c, png).status_code == 200
        for t in threads:
            t.join()
        metrics = httpx.get(url + "/metrics").text
    assert good_codes == [200] * 60
    assert 'cgil_errors_total{status="400"} 5' in metrics and 'cgil_errors_total{status="413"} 3' in metrics


def test_queue_overflow_answers_503_with_retry_after(bundle, new_digits):
    from runtime import Classifier

    clf = Classifier(bundle, backend="onnxruntime")
    real = clf.backend.embed

    def slow_embed(pixels):  # a busy engine: 0.3 s per call (the real ONNX Runtime session underneath)
        time.sleep(0.3)
        return real(pixels)

    clf.backend.embed = slow_embed
    png = digit_png(new_digits)
    with running_server(bundle, classifier=clf, max_batch=1, max_wait_ms=0, max_queue=2) as url:
        barrier = threading.Barrier(8)
        responses: list[httpx.Response] = []

        def one() -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                barrier.wait()
                responses.append(post_image(c, png))

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in responses)
        assert set(codes) == {200, 503} and codes.count(200) >= 2, codes
        full = [r for r in responses if r.status_code == 503]
        assert all(r.headers["retry-after"] == "1" and "queue full" in r.json()["error"] for r in full)
        time.sleep(0.1)
        assert post_image(httpx.Client(base_url=url, timeout=30), png).status_code == 200  # drained: serving again


def test_admin_reload_needs_loopback_or_token(bundle):
    from runtime.heads import add_zero_shot

    with running_server(bundle, admin_token="s3cret", watch_interval_s=0) as url, httpx.Client(base_url=url) as c:
        remote = {"X-Forwarded-For": "203.0.113.7"}  # a non-loopback peer behind a local reverse proxy (uvicorn proxy headers)
        assert c.post("/v1/admin/reload", headers=remote).status_code == 403
        assert c.post("/v1/admin/reload", headers={**remote, "Authorization": "Bearer wrong"}).status_code == 403
        v = add_zero_shot(bundle, ["forklift"])["version"]
        assert c.get("/v1/classes").json()["head_version"] == 4  # no file watch: still the old head
        r = c.post("/v1/admin/reload", headers={**remote, "Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json() == {"version": v, "previous": 4, "swapped": True}
        assert "forklift" in c.get("/v1/classes").json()["classes"]
        assert c.post("/v1/admin/reload").status_code == 200  # plain loopback peer
    with running_server(bundle, admin_token="s3cret", admin_loopback=False) as url, httpx.Client(base_url=url) as c:
        assert c.post("/v1/admin/reload").status_code == 403
        assert c.post("/v1/admin/reload", headers={"X-Admin-Token": "s3cret"}).status_code == 200


def test_a_corrupt_new_head_is_refused_and_the_old_one_keeps_serving(bundle, new_digits):
    from runtime.heads import add_zero_shot

    with running_server(bundle, watch_interval_s=0) as url, httpx.Client(base_url=url) as c:
        info = add_zero_shot(bundle, ["forklift"])
        (Path(info["directory"]) / "head.safetensors").write_bytes(b"not the published bytes")  # bit rot
        r = c.post("/v1/admin/reload")
        assert r.status_code == 409 and "head.safetensors" in r.json()["error"]
        assert c.get("/v1/classes").json()["head_version"] == 4
        assert post_image(c, digit_png(new_digits)).json()["head_version"] == 4


def test_serving_path_never_imports_torch(bundle):
    code = ("import sys; from runtime.server import ServeConfig, create_app; "
            f"app = create_app(ServeConfig({str(bundle)!r}, backend='onnxruntime')); "
            "import runtime.serve_commands, runtime.heads, runtime.store_info; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_cgil_serve_command_with_token_from_the_environment(bundle):
    import os

    from benchmarks.serve import free_port, wait_ready

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "CGIL_ADMIN_TOKEN": "from-env"}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", str(bundle), "--port", str(port), "--backend",
                             "onnxruntime", "--no-loopback-admin", "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_ready(url, timeout=60, proc=proc)
        assert httpx.post(url + "/v1/admin/reload").status_code == 403
        assert httpx.post(url + "/v1/admin/reload", headers={"Authorization": "Bearer from-env"}).status_code == 200
        assert httpx.get(url + "/openapi.json").json()["info"]["title"] == "cgil serve"
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) in (0, -15)  # uvicorn re-raises SIGTERM after a graceful shutdown
