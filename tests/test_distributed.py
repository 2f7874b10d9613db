"""Feature extraction across processes (torch.distributed, gloo on loopback) equals one process exactly."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from cgil.distributed import batch_shard

CLASSES = [0, 3, 7]  # digits test split: 163 images, batch 16 -> 11 batches, the last one partial
BATCH = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, clip, ds, tmp: str) -> None:
    # what torchrun would set; the process is forked, so the model and the dataset are inherited
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from cgil import distributed
    from cgil.features import embed_items, task_features
    from cgil.progress import Reporter
    from cgil.train import run

    assert distributed.init_from_env("cpu") and distributed.world_size() == world
    cache = Path(tmp) / "cache"
    feats, labels = task_features(clip, ds, "test", CLASSES, cache, BATCH)
    files = sorted((cache / "features").glob("*.safetensors"))
    again, _ = task_features(clip, ds, "test", CLASSES, cache, BATCH)  # cache hit, broadcast from rank 0
    odd = embed_items(clip, ds.train.items[:5], BATCH)  # fewer batches than ranks: rank 1 embeds nothing
    # a whole run under torch.distributed: every rank learns the same, rank 0 alone writes the run
    metrics = run(_tiny_cfg(), Path(tmp) / "run", reporter=Reporter(enabled=False), cache_dir=cache)
    torch.save({"feats": feats, "labels": labels, "again": again, "odd": odd, "n_cache_files": len(files),
                "metrics": metrics}, Path(tmp) / f"rank{rank}.pt")
    distributed.shutdown()


def _tiny_cfg():
    from cgil.config import TrainConfig

    return TrainConfig.for_dataset("digits", tasks=2, epochs=1, passes=1)


def test_batch_shards_cover_items_on_batch_boundaries():
    for n in (0, 1, 15, 16, 17, 163, 1000):
        for world in (1, 2, 3, 5):
            spans = [batch_shard(n, BATCH, r, world) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert all(start % BATCH == 0 for start, stop in spans if stop > start)


@pytest.mark.slow
def test_two_gloo_processes_equal_single_process(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    from cgil.tensor_io import load_tensors
    from cgil.clip import create_clip
    from cgil.data import get_dataset
    from cgil.features import cache_key, embed_items, task_features

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        clip = create_clip("cgil-tiny", None, "cpu", 0)
        ds = get_dataset("digits")
        single, labels = task_features(clip, ds, "test", CLASSES, None, BATCH)
        single_odd = embed_items(clip, ds.train.items[:5], BATCH)
        # fork (not spawn): the workers inherit the imported modules, which keeps this test to seconds
        mp.start_processes(_worker, args=(2, _free_port(), clip, ds, str(tmp_path)), nprocs=2, join=True,
                           start_method="fork")
    finally:
        torch.set_num_threads(threads)

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert single.shape[0] == len(labels) == 163
    for r in ranks:
        assert torch.equal(r["feats"], single), "distributed features differ from single-process ones"
        assert torch.equal(r["labels"], labels)
        assert torch.equal(r["again"], single)
        assert torch.equal(r["odd"], single_odd)
        assert r["n_cache_files"] == 1  # written once, by rank 0, before anyone went on
    # the run inside the workers caches more tasks; look up this task's file by its key
    cached = load_tensors(tmp_path / "cache" / "features" / f"{cache_key(clip, ds, 'test', CLASSES)}.safetensors")
    assert torch.equal(cached["features"], single)
    m0, m1 = ranks[0]["metrics"], ranks[1]["metrics"]
    assert m0["accuracy_matrix"] == m1["accuracy_matrix"] and len(m0["accuracy_matrix"]) == 2
    assert (tmp_path / "run" / "config.json").exists() and (tmp_path / "run" / "state" / "CURRENT").exists()


@pytest.mark.skipif(os.environ.get("CGIL_TEST_TORCHRUN") != "1",
                    reason="starts 3 fresh Python processes (~30 s on 2 cores); set CGIL_TEST_TORCHRUN=1")
@pytest.mark.slow
def test_torchrun_cli_train(tmp_path):
    """The documented entry: `torchrun --nproc-per-node 2 -m cli train ...` finishes and caches each task once."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CGIL_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "cli", "train", "--dataset", "digits", "--tasks", "2",
           "--epochs", "1", "--passes", "1", "--quiet", "--out", str(tmp_path / "run")]
    res = subprocess.run(cmd, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (tmp_path / "run" / "config.json").exists()
    assert len(list((tmp_path / "cache" / "features").glob("*.safetensors"))) == 4  # 2 tasks x train/test
