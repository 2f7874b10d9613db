"""Every name of the on-disk formats (runs' state, bundles, head versions), in one place.

runtime/ owns the formats: the learner and the exporter write them through these names, the device
side reads them. Changing one of these is a format change: bump SCHEMA_VERSION.
"""
from __future__ import annotations

import re

SCHEMA_VERSION = 1

MANIFEST = "manifest.json"  # schema version, kind, model identity, sha256 + size of every file
POINTER = "CURRENT"  # one line: the name of the current version folder
HISTORY = "history.json"  # the published versions kept as rollback targets, oldest first
LOCK = ".update.lock"
NEWEST = "NEWEST"  # heads/: the highest version number ever published (pruned numbers are never reused)

# kinds written into manifests
BUNDLE_KIND = "cgil-bundle"
HEAD_KIND = "cgil-head"
STATE_KIND = "cgil-learner-state"

# a bundle
HEADS_DIR = "heads"
VERSION_PREFIX = "head-"
MAX_VERSION_DIGITS = 9  # head-0001 .. head-999999999: a number read from disk never grows a name past this
MAX_VERSION = 10 ** MAX_VERSION_DIGITS - 1
VERSION_RE = re.compile(rf"^head-(\d{{4,{MAX_VERSION_DIGITS}}})$")
IMAGE_ONNX = "image.onnx"
TEXT_ZERO_SHOT_ONNX = "text_zero_shot.onnx"
TEXT_PROMPTED_ONNX = "text_prompted.onnx"
TOKENIZER_DIR = "tokenizer"
# graph inputs and outputs
IMAGE_INPUT, IMAGE_OUTPUT = "pixels", "image_embedding"
TOKENS, CONTEXT = "tokens", "context"
TEXT_OUTPUT, KEY_OUTPUT = "text_embedding", "key"  # not "embedding": the exporter uses that name inside

# a head version (and a run's state version)
HEAD_TENSORS = "head.safetensors"  # keys (C, D), future_keys (F, D)
HEAD_META = "head.json"
PROMPTS_TENSORS = "prompts.safetensors"
PROMPTS_META = "prompts.json"
STORE_TENSORS = "store.safetensors"
STORE_META = "store.json"
PROMPT_CONTEXT = "prompt_context.safetensors"  # the prompted text graph's inputs
PROGRESS = "progress.json"

STORE_PRECISIONS = ("fp32", "fp16")
KEEP = 3  # head versions kept after a publish (`cgil update --keep N`): the current one and two rollback targets


def version_name(version: int) -> str:
    return f"{VERSION_PREFIX}{version:04d}"
