"""Saving and loading a learner: prompts, context generator, replay store and head.

A run keeps its state under RUN/state/, one version per finished task, published atomically
(see artifacts.publish_version). Every file is listed with its sha256 in the version's manifest.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from runtime.artifacts import atomic_write_json, current_dir, publish_version, read_json, verify_manifest
from runtime.errors import CgilError
from runtime.format import POINTER, PROGRESS, PROMPTS_META, PROMPTS_TENSORS, STATE_KIND, STORE_META, STORE_TENSORS
from runtime.heads import write_head_files
from runtime.identity import ModelIdentity

from .clip import FrozenClip
from .generators import GeneratorConfig
from .learner import AlignConfig, Learner
from .tensor_io import load_tensors, save_tensors


def head_payload(learner: Learner, future_ids: list[int], future_names: list[str], zero_shot_future: torch.Tensor,
                 version: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The deployable classifier: normalised keys of learned classes (+ zero-shot keys of known future names).

    Written by runtime.heads.write_head_files, the one writer of head files for runs and bundles alike.
    """
    tensors = {"keys": learner.head().float().cpu()}
    if future_ids:
        tensors["future_keys"] = torch.nn.functional.normalize(zero_shot_future.float().cpu(), dim=-1)
    meta = {
        "head_version": version,
        "class_ids": learner.class_ids,
        "class_names": learner.class_names,
        "future_class_ids": future_ids,
        "future_class_names": future_names,
        "model": learner.clip.identity.to_dict(),
    }
    return tensors, meta


def save_state(run_dir: Path, learner: Learner, task: int, progress: dict[str, Any], head: tuple[dict, dict]) -> Path:
    prompt_tensors = learner.prompts.learned_state()
    store_tensors, store_index = learner.store_state()
    prompts_meta = {"n_ctx": learner.prompts.n_ctx, "class_ids": learner.class_ids, "class_names": learner.class_names}
    store_meta = {"generator": learner.gen_cfg.to_dict(), "groups": store_index}

    def write(d: Path) -> None:
        save_tensors(d / PROMPTS_TENSORS, prompt_tensors)
        atomic_write_json(d / PROMPTS_META, prompts_meta)
        save_tensors(d / STORE_TENSORS, store_tensors)
        atomic_write_json(d / STORE_META, store_meta)
        keys, meta = head
        write_head_files(d, keys["keys"].numpy(), keys["future_keys"].numpy() if "future_keys" in keys else None, meta)
        atomic_write_json(d / PROGRESS, {"finished_task": task, **progress})

    return publish_version(Path(run_dir) / "state", f"task-{task:03d}", write, kind=STATE_KIND,
                           extra={"model": learner.clip.identity.to_dict()})


def state_dir(run_dir: Path) -> Optional[Path]:
    root = Path(run_dir) / "state"
    return current_dir(root) if (root / POINTER).exists() else None


def check_identity(saved: dict, clip: FrozenClip, where: Path) -> None:
    other = ModelIdentity.from_dict(saved, str(where))
    if not other.same_weights(clip.identity):
        raise CgilError(
            f"{where} was made with {other.model} ({other.weights_id}); the loaded model is "
            f"{clip.identity.model} ({clip.identity.weights_id})"
        )


def load_learner(directory: Path, clip: FrozenClip, align_cfg: Optional[AlignConfig] = None) -> tuple[Learner, dict]:
    """Rebuild a learner from a verified state version (a run's state/task-XXX, or a bundle's copy)."""
    directory = Path(directory)
    manifest = verify_manifest(directory)
    check_identity(manifest["model"], clip, directory)
    prompts_meta = read_json(directory / PROMPTS_META)
    store_meta = read_json(directory / STORE_META)
    learner = Learner(clip, GeneratorConfig.from_dict(store_meta["generator"]), align_cfg or AlignConfig(),
                      n_ctx=prompts_meta["n_ctx"])
    prompt_state = load_tensors(directory / PROMPTS_TENSORS)
    learner.prompts.load_learned_state({k: v.to(clip.device) for k, v in prompt_state.items()},
                                       prompts_meta["class_ids"], prompts_meta["class_names"])
    learner.load_store(load_tensors(directory / STORE_TENSORS), store_meta["groups"])
    progress = read_json(directory / PROGRESS) if (directory / PROGRESS).exists() else {}
    return learner, progress
