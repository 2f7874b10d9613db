"""The frozen CLIP model: creation from any open_clip architecture and weights, and its identity.

Everything downstream (feature cache keys, saved heads, exported bundles) refers to a model by
`ModelIdentity`, so a head trained on one model can never be silently applied to another.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import open_clip
import torch

from runtime.artifacts import sha256_file
from runtime.errors import CgilError
from runtime.identity import ModelIdentity
from .checks import CHECKPOINT_SUFFIXES

_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(_CONFIG_DIR)  # our shipped architectures (e.g. cgil-tiny) become open_clip names

DEFAULT_MODEL = "cgil-tiny"


@dataclass
class FrozenClip:
    model: torch.nn.Module
    preprocess: Callable  # open_clip's evaluation transform: PIL image -> tensor
    tokenizer: Callable
    identity: ModelIdentity
    device: torch.device

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().exp()

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings for a preprocessed batch (N, 3, H, W)."""
        return self.model.encode_image(pixels.to(self.device)).float()


def valid_models() -> list[str]:
    return open_clip.list_models()


def _resolve_weights(model: str, pretrained: Optional[str], seed: int) -> str:
    if pretrained is None or pretrained in ("", "none", "random"):
        return f"random:seed={seed}"
    if Path(pretrained).is_file():
        return "sha256:" + sha256_file(pretrained)
    if Path(pretrained).suffix in CHECKPOINT_SUFFIXES or "/" in pretrained:
        raise CgilError(f"--pretrained {pretrained}: no such checkpoint file")
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained not in tags:
        hint = ", ".join(tags) if tags else "none for this architecture"
        raise CgilError(
            f"--pretrained {pretrained!r} is neither a checkpoint file nor a known tag for {model} "
            f"(known tags: {hint})"
        )
    _require_tag_weights(model, pretrained)
    return f"tag:{pretrained}"


NO_WEIGHTS_HINT = ("give a local checkpoint file instead: --pretrained /path/to/weights.pt (an open_clip "
                   "checkpoint or torch.save(model.state_dict()) of this architecture)")


def _tag_cached(cfg: dict) -> bool:
    """Whether open_clip would find the tag's weights on disk without the network."""
    if cfg.get("file"):
        return Path(cfg["file"]).is_file()
    if cfg.get("hf_hub"):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return False
        repo, filename = os.path.split(cfg["hf_hub"])
        names = [filename or "open_clip_pytorch_model.bin"]
        names.insert(0, os.path.splitext(names[0])[0] + ".safetensors")
        return any(isinstance(try_to_load_from_cache(repo, n), str) for n in names)
    if cfg.get("url"):
        return (Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])).is_file()
    return False


def _reachable(host: str, timeout_s: float = 3.0) -> bool:
    """A TCP connection to host:443 within timeout_s (DNS included, hence the thread)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout_s).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])


def _require_tag_weights(model: str, tag: str) -> None:
    """Fail in seconds, not after a minute of download retries, when a tag's weights cannot be had."""
    cfg = open_clip.get_pretrained_cfg(model, tag) or {}
    if _tag_cached(cfg):
        return
    if os.environ.get("CGIL_OFFLINE") or os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
        raise CgilError(f"--pretrained {tag}: the {model} weights are not cached and this is offline "
                        f"(CGIL_OFFLINE/HF_HUB_OFFLINE); {NO_WEIGHTS_HINT}")
    host = (urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
            if cfg.get("hf_hub") else urllib.parse.urlparse(cfg.get("url", "")).hostname)
    if host and not _reachable(host):
        raise CgilError(f"--pretrained {tag}: no network to download the {model} weights from {host}; "
                        f"{NO_WEIGHTS_HINT}")


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip warns on every random-weight model; random weights are a deliberate choice here."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def create_clip(
    model: str = DEFAULT_MODEL,
    pretrained: Optional[str] = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> FrozenClip:
    """Create a frozen open_clip model in eval mode.

    Random weights are drawn from a generator seeded with `seed` so that two processes given the
    same arguments hold bit-identical models (the feature cache relies on this).
    """
    if model not in valid_models():
        raise CgilError(f"unknown model {model!r}; choose one of: {', '.join(valid_models())}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CgilError("--device cuda was asked for but CUDA is not available on this machine")
    weights_id = _resolve_weights(model, pretrained, seed)
    load = None if weights_id.startswith("random:") else pretrained
    # torch.manual_seed seeds every CUDA device too: fork their RNGs as well, or creating a model
    # would reset the caller's global CUDA random stream.
    gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=gpus), _quiet_open_clip():
        torch.manual_seed(seed)
        try:
            clip_model, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=load, device=device)
        except Exception as e:  # a text file, another architecture's weights, a failed download: one line
            if load is None:
                raise
            reason = " ".join(line.strip() for line in str(e).strip().splitlines()[:2])[:200] or type(e).__name__
            if "weights_only" in str(e) or "Weights only load failed" in str(e):
                # torch's advice to unpickle with weights_only=False runs the file's code: not ours to repeat
                reason = "not a torch.save file of tensors only"
            if Path(load).is_file():
                raise CgilError(f"--pretrained {load}: cannot load this file into {model} ({type(e).__name__}: "
                                f"{reason}); it must be an open_clip checkpoint or torch.save(model.state_dict()) "
                                f"of a {model} model") from e
            raise CgilError(f"--pretrained {load}: cannot get the weights of {model} ({type(e).__name__}: "
                            f"{reason}); {NO_WEIGHTS_HINT}") from e
    clip_model.eval().requires_grad_(False)
    cfg = open_clip.get_model_config(model) or {}
    image_size = cfg.get("vision_cfg", {}).get("image_size", 224)
    identity = ModelIdentity(
        model=model,
        pretrained=str(pretrained) if load else None,
        weights_id=weights_id,
        config_sha=hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16],
        embed_dim=int(cfg.get("embed_dim", 0)),
        image_size=int(image_size if isinstance(image_size, int) else image_size[0]),
        context_length=int(cfg.get("text_cfg", {}).get("context_length", 77)),
    )
    tokenizer = open_clip.get_tokenizer(model)
    return FrozenClip(clip_model, preprocess, tokenizer, identity, device)


def preprocess_config(clip: FrozenClip) -> dict[str, Any]:
    """The evaluation preprocessing as plain JSON data (what a torch-free runtime must reproduce)."""
    cfg = dict(open_clip.get_model_preprocess_cfg(clip.model))
    cfg.setdefault("interpolation", "bicubic")
    cfg.setdefault("resize_mode", "shortest")
    cfg.setdefault("fill_color", 0)
    cfg = json.loads(json.dumps(cfg))  # tuples -> lists, plain JSON types
    size = cfg.get("size", clip.identity.image_size)
    cfg["size"] = [size, size] if isinstance(size, int) else list(size)
    return cfg
