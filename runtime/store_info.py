"""How many bytes each class costs in a bundle's current head version, against raw features or images.

Read from safetensors headers and JSON only: no tensor is loaded, no torch is needed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from .bundle import load_head
from .format import HEAD_TENSORS, PROMPT_CONTEXT, PROMPTS_META, PROMPTS_TENSORS, STORE_META, STORE_TENSORS


def _tensor_bytes(path: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (shape, bytes) from a safetensors header, without loading the data."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: (tuple(v["shape"]), v["data_offsets"][1] - v["data_offsets"][0]) for k, v in header.items()
            if k != "__metadata__"}


def store_info(bundle: str | os.PathLike, images_per_class: Optional[int] = None,
               bytes_per_image: Optional[float] = None) -> dict[str, Any]:
    """Bytes per class of each part of the current head version, vs keeping raw features or raw images.

    Parts per class: `generator` (its share of its task group in store.safetensors), `prompt` (its
    context vectors and z_c in prompts.safetensors), `context` (its row of prompt_context.safetensors)
    and `key` (its row of head.safetensors). Shared: the context generator g and the JSON files.
    Raw features = images x D x 4 bytes; raw images = the encoded bytes of the images an update was
    given (recorded in store.json), or --images-per-class / --bytes-per-image for classes without a record.
    """
    head = load_head(bundle)
    d = head.directory
    dim = int(head.keys.shape[1]) if head.keys.size else head.identity.embed_dim
    store_meta = json.loads((d / STORE_META).read_text()) if (d / STORE_META).exists() else {"groups": []}
    store = _tensor_bytes(d / STORE_TENSORS) if (d / STORE_TENSORS).exists() else {}
    prompts = _tensor_bytes(d / PROMPTS_TENSORS) if (d / PROMPTS_TENSORS).exists() else {}
    context = _tensor_bytes(d / PROMPT_CONTEXT) if (d / PROMPT_CONTEXT).exists() else {}
    keys = _tensor_bytes(d / HEAD_TENSORS)
    pmeta = json.loads((d / PROMPTS_META).read_text()) if (d / PROMPTS_META).exists() else {"class_ids": [], "class_names": []}
    id_to_name = dict(zip(pmeta["class_ids"], pmeta["class_names"]))
    n_learned = len(pmeta["class_ids"])

    def per_row(tensors: dict, rows: int, names: Optional[Sequence[str]] = None) -> float:
        return sum(b for k, (shape, b) in tensors.items() if (names is None or k in names) and shape and shape[0] == rows) / max(rows, 1)

    prompt_row = per_row(prompts, n_learned, ["ctx", "zero_shot"])
    shared_g = sum(b for k, (_, b) in prompts.items() if k.startswith("generator."))
    context_row = per_row(context, n_learned)
    key_row = keys["keys"][1] / max(len(head.class_names), 1)
    classes, precision = [], store_meta.get("precision", "fp32")
    for g in store_meta.get("groups", []):
        ids = [int(c) for c in g["class_ids"]]
        group_bytes = sum(b for k, (_, b) in store.items() if k.startswith(f"group{g['group']}."))
        for c in ids:
            n = g.get("images", {}).get(str(c), images_per_class)
            raw = g.get("image_bytes", {}).get(str(c))
            if raw is None and n is not None and bytes_per_image is not None:
                raw = n * bytes_per_image
            row = {"class": id_to_name.get(c, str(c)), "class_id": c, "generator": g.get("kind", ""),
                   "generator_bytes": group_bytes / len(ids), "prompt_bytes": prompt_row,
                   "context_bytes": context_row, "key_bytes": key_row}
            row["total_bytes"] = row["generator_bytes"] + prompt_row + context_row + key_row
            row["images"] = n
            row["raw_features_bytes"] = n * dim * 4 if n is not None else None
            row["raw_images_bytes"] = raw
            classes.append(row)
    for name in head.class_names[n_learned:]:
        classes.append({"class": name, "class_id": -1, "generator": "zero-shot", "generator_bytes": 0,
                        "prompt_bytes": 0, "context_bytes": 0, "key_bytes": key_row, "total_bytes": key_row,
                        "images": None, "raw_features_bytes": None, "raw_images_bytes": None})
    files = {p.name: p.stat().st_size for p in sorted(d.iterdir()) if p.is_file()}
    return {"bundle": str(bundle), "head_version": head.version, "directory": str(d), "embed_dim": dim,
            "store_precision": precision, "generator": store_meta.get("generator", {}).get("kind"),
            "classes": classes, "shared_bytes": {"context_generator_g": shared_g},
            "files": files, "total_bytes": sum(files.values())}
