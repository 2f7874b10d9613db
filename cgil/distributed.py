"""torch.distributed for multi-process feature extraction, started by `torchrun`.

`torchrun --nproc-per-node N -m cli train ...` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; `init_from_env` joins the process group (gloo on CPU, nccl on CUDA, one GPU per local
rank). Without those variables, or with WORLD_SIZE=1, everything here is a no-op and cgil runs as
one process. Only feature extraction is split across ranks; every rank then holds the same features
and runs the same (seeded, deterministic) learner, and only rank 0 writes files or prints.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from runtime.errors import CgilError


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(device: str = "cpu", timeout_s: float = 1800.0) -> bool:
    """Join the process group torchrun describes. Returns True when running with more than one process.

    `device` is the run's device setting; on CUDA each process takes GPU LOCAL_RANK and uses nccl.
    """
    if is_distributed():
        return True
    if env_world_size() <= 1 or not dist.is_available():
        return False
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise CgilError(f"WORLD_SIZE={env_world_size()} but {', '.join(missing)} not set: start with torchrun")
    cuda = device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise CgilError("--device cuda under torchrun, but CUDA is not available")
        torch.cuda.set_device(rank_gpu(device, local_rank(), local_world_size(), torch.cuda.device_count()))
    backend = "nccl" if cuda and dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return is_distributed()


def local_world_size() -> int:
    try:
        return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        return 1


def rank_gpu(device: str, local_rank_: int, local_world: int, gpus: int) -> int:
    """The GPU of this process under torchrun: GPU LOCAL_RANK, one process per GPU.

    NCCL refuses two ranks on one GPU, and `--device cuda:N` would put every rank on GPU N: both are
    refused here with what to run instead, before the process group hangs or fails.
    """
    if device != "cuda" and local_world > 1:
        raise CgilError(f"--device {device} under torchrun would put all {local_world} processes on one GPU; "
                        "pass --device cuda (each process takes GPU LOCAL_RANK) and choose GPUs with CUDA_VISIBLE_DEVICES")
    if device.startswith("cuda:") and local_world == 1:
        index = int(device.split(":", 1)[1])
        if index >= gpus:
            raise CgilError(f"--device {device}: only {gpus} GPU(s) visible")
        return index
    if local_world > gpus:
        raise CgilError(f"torchrun started {local_world} processes per node but only {gpus} GPU(s) are visible; "
                        f"NCCL needs one GPU per process: use --nproc-per-node {gpus} (or --device cpu with gloo)")
    return local_rank_


def barrier() -> None:
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def batch_shard(n: int, batch_size: int, rank_: Optional[int] = None, world: Optional[int] = None) -> tuple[int, int]:
    """This rank's contiguous item range [start, stop) when n items are cut into whole batches.

    Shards start on batch boundaries, so every batch a rank embeds is exactly a batch that the
    single-process loop embeds: same items, same batch shape, hence the same floating-point result.
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    n_batches = -(-n // batch_size) if n else 0
    b0, b1 = n_batches * r // w, n_batches * (r + 1) // w
    return min(b0 * batch_size, n), min(b1 * batch_size, n)


def all_gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows in rank order (identical result on every rank). CPU tensor in and out."""
    if not is_distributed():
        return local
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, local.detach().cpu())
    return torch.cat(parts)


def broadcast(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (pickled; fine for decisions and cached feature tensors)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]
