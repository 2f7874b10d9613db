"""`cgil bench gpu` and the latency table's GPU rows, on a machine without a GPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


def _doc(folder: Path) -> dict:
    (path,) = list(folder.glob("gpu-*.json"))
    return json.loads(path.read_text())


def test_dry_run_runs_every_setup_and_reports_every_gpu_step_as_skipped(tmp_path, capsys):
    from benchmarks import gpu

    rows = gpu.main(["--dry-run", "--quick", "--out", str(tmp_path)])
    doc = _doc(tmp_path)
    assert doc["rows"] == rows and doc["meta"]["dry_run"] is True
    skipped = [r for r in rows if r["item"] == "all"]
    assert [r["step"] for r in skipped] == list(gpu.STEPS)
    assert {r["part"] for r in rows} == {1, 2}
    assert all(r["status"] == "skipped" and r["note"].startswith("skipped: no GPU (--dry-run); setup ran: ")
               for r in skipped), [r["note"] for r in skipped]
    static = [r for r in rows if r["item"].endswith("static check")]  # the tensorrt step's setup: CPU work, real rows
    assert [r["item"] for r in static] == [f"cgil-tiny {p} static check" for p in ("fp32", "fp16", "int8")]
    assert all(r["status"] == "ok" for r in static)
    printed = capsys.readouterr().out
    assert "skipped:\n  torch-latency (all): skipped: no GPU" in printed and "tensorrt (all)" in printed
    assert len(list(tmp_path.glob("gpu-*.md"))) == 1


def test_cli_runs_the_gpu_bench(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, ["bench", "gpu", "--dry-run", "--steps", "resume", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in _doc(tmp_path)["rows"]] == ["resume"]


def test_a_failing_step_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    from benchmarks import gpu

    def broken(ctx, state):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def fine(ctx, state):
        ctx.add(1, "resume", "stop after task 1, resume", "ok")

    monkeypatch.setitem(gpu.STEPS, "update", (1, lambda ctx: {}, broken))
    monkeypatch.setitem(gpu.STEPS, "resume", (1, lambda ctx: {}, fine))
    rows = gpu.main(["--device", "cpu", "--steps", "update", "resume", "--out", str(tmp_path)])
    assert [(r["step"], r["status"]) for r in rows] == [("update", "failed"), ("resume", "ok")]
    assert rows[0]["note"] == "run: RuntimeError: CUDA error: an illegal memory access was encountered"


@pytest.mark.slow
def test_cpu_smoke_run_of_the_torch_steps(tmp_path):
    """The part-1 torch steps at toy sizes on the CPU: the code a GPU machine will run, minus CUDA."""
    from benchmarks import gpu

    rows = gpu.main(["--device", "cpu", "--quick", "--steps", "torch-latency", "update", "--out", str(tmp_path)])
    latency = [r for r in rows if r["step"] == "torch-latency" and not r["item"].endswith("end to end")]
    assert [r["item"] for r in latency] == ["cgil-tiny fp32 batch 1", "cgil-tiny fp32 batch 8"]
    assert all(r["status"] == "ok" and r["min_cosine"] >= 0.9999 and r["p99_ms"] >= r["p50_ms"] > 0 for r in latency)
    end_to_end = [r for r in rows if r["item"].endswith("end to end")]
    assert [r["item"] for r in end_to_end] == ["cgil-tiny fp32 batch 1 end to end", "cgil-tiny fp32 batch 8 end to end"]
    assert all(r["note"] == "host uint8 in, scores out (copies included)" and r["p50_ms"] > 0 for r in end_to_end)
    update = {r["item"]: r for r in rows if r["step"] == "update"}
    assert set(update) == {"batched: fit 3 VAE x2 passes", "per-class loop: fit 3 VAE x2 passes", "batched vs per-class loop"}
    assert update["batched vs per-class loop"]["speedup_x"] > 0
    assert "median of 2 (interleaved)" in update["batched: fit 3 VAE x2 passes"]["note"]


def test_latency_registers_the_gpu_engines_and_says_why_they_did_not_run(tmp_path):
    import torch

    from benchmarks import latency
    from benchmarks.latency_gpu import GPU_ENGINES

    assert set(GPU_ENGINES) <= set(latency.ENGINES)
    assert "ORT CUDA int8" not in latency.ENGINES  # the CUDA EP runs QDQ as float: not an int8 row
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rows = latency.bench_model("cgil-tiny", [1], ["torch eager", "torch CUDA fp16", "TensorRT fp16"], 2, 1, tmp_path,
                               8, None, min_repeats=1, cell_seconds=30.0)
    notes = {r["engine"]: r.get("note") for r in rows}
    assert notes["torch CUDA fp16"] == "not measured: no CUDA GPU"
    assert notes["TensorRT fp16"] == "not measured: no CUDA GPU"
    assert "p50_ms" in next(r for r in rows if r["engine"] == "torch eager")


def test_benchmark_modules_stay_below_400_lines():
    root = Path(__file__).parent.parent / "benchmarks"
    for name in ("latency.py", "latency_gpu.py", "gpu.py", "peaks.py"):
        assert len((root / name).read_text().splitlines()) < 400, name


def test_part_two_says_what_is_missing_without_exporting_anything(tmp_path, capsys):
    import onnxruntime as ort

    from benchmarks import gpu

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    rows = gpu.main(["--device", "cpu", "--steps", "tensorrt", "--out", str(tmp_path)])
    assert [(r["step"], r["status"]) for r in rows] == [("tensorrt", "skipped"), ("ort-cuda", "skipped")]
    assert "pip install 'cgil[tensorrt]'" in rows[0]["note"]
    assert rows[1]["note"] == "skipped: onnxruntime-gpu not installed (onnxruntime has no CUDAExecutionProvider)"
    assert "tensorrt (all): skipped: TensorRT needs the optional extra" in capsys.readouterr().out
