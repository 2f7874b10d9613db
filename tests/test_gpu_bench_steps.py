"""`cgil bench gpu` (issue 18): results outside the checkout, two torchrun ranks, --device cuda:N, on the CPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_results_go_outside_the_checkout_unless_asked(tmp_path, monkeypatch):
    from benchmarks import gpu

    results = ROOT / "benchmarks" / "results"
    before = {p: p.stat().st_mtime_ns for p in results.glob("gpu-*")}
    monkeypatch.setenv("CGIL_CACHE", str(tmp_path / "cache"))
    gpu.main(["--dry-run", "--quick", "--steps", "resume"])
    assert [p.name.startswith("gpu-") for p in (tmp_path / "cache" / "bench").glob("*")] == [True, True]
    assert {p: p.stat().st_mtime_ns for p in results.glob("gpu-*")} == before
    assert "bench gpu --out benchmarks/results" in (ROOT / "Makefile").read_text()  # `make bench-tables`


@pytest.mark.slow  # two torchrun processes
def test_torchrun_step_starts_two_ranks_that_shard_gather_and_share_the_cache(tmp_path):
    """Two real gloo processes under torchrun on the CPU: what a machine with one GPU runs too."""
    from benchmarks import gpu

    rows = gpu.main(["--device", "cpu", "--quick", "--steps", "torchrun", "--out", str(tmp_path)])
    (row,) = rows
    assert row["status"] == "ok" and row["item"] == "feature extraction, 2 processes, gloo", row["note"]
    assert "256 images in 2 ranks; gathered and cached features equal to one process: True" in row["note"]


def test_device_index_reaches_every_gpu_engine(tmp_path):
    from benchmarks.gpu import Context
    from runtime.backends import provider_options

    assert Context("cuda:1", True, tmp_path, 0.0).index == 1 and Context("cuda", True, tmp_path, 0.0).index == 0
    graph = tmp_path / "image.onnx"
    graph.write_bytes(b"graph")
    assert provider_options("CUDAExecutionProvider", "fp32", graph, device_id=1) == {"device_id": 1}
    assert provider_options("TensorrtExecutionProvider", "fp16", graph, cache_root=tmp_path, device_id=1)["device_id"] == 1
    assert provider_options("CPUExecutionProvider", "fp32", graph, device_id=1) == {}
    source = json.dumps([(ROOT / "benchmarks" / f).read_text() for f in ("gpu.py", "latency_gpu.py", "gpu_tensorrt.py")])
    assert ".cuda()" not in source and 'device="cuda"' not in source  # nothing pins the current GPU 0
