"""torch tensors to and from safetensors files, written atomically (runtime.artifacts) and read with clear errors."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from runtime.artifacts import atomic_write_bytes
from runtime.errors import CgilError


def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> bytes:
    from safetensors.torch import save as st_save

    return st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    atomic_write_bytes(path, tensors_to_bytes(tensors, metadata))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as st_load

    path = Path(path)
    try:
        return st_load(path.read_bytes())
    except FileNotFoundError:
        raise CgilError(f"missing file {path}") from None
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CgilError(f"corrupt tensor file {path}: {e}") from e
