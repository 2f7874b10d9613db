"""runtime.Classifier: the one predictor class. Images in, class names and scores out."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from .errors import CgilError
from .names import clean_names
from .backends import ImageBackend, make_backend
from .bundle import Head, load_head, open_bundle
from .preprocess import ImageLike, Preprocess


@dataclass(frozen=True)
class Prediction:
    labels: list[str]
    scores: list[float]  # softmax(logit_scale * cosine) over the head's classes
    similarities: list[float]  # cosine similarity of the image to each label's key

    def to_dict(self) -> dict[str, Any]:
        return {"labels": self.labels, "scores": self.scores, "similarities": self.similarities}


class Classifier:
    """A verified bundle's image engine plus a swappable head.

    Classifier(bundle, backend="auto" | "onnxruntime" | "tensorrt" | a registered name | an ImageBackend, providers=None)
    `predict(images, top_k)` and `embed(images)` take paths, PIL images or uint8 arrays.
    """

    def __init__(self, bundle: str | Path, backend: Union[str, ImageBackend] = "auto",
                 providers: Optional[Sequence[str]] = None, include_future: bool = False, threads: int = 0):
        self.bundle = Path(bundle)
        self.manifest = open_bundle(self.bundle)
        self.identity = self.manifest.identity
        self.preprocess = Preprocess.from_config(self.manifest.preprocess)
        self.logit_scale = self.manifest.logit_scale
        self.include_future = include_future
        self.backend = make_backend(backend, self.bundle, self.manifest, providers, threads)
        expected = getattr(self.backend, "input_shape", None)  # (H, W, 3) of the ONNX graph, when static
        if expected and all(isinstance(d, int) for d in expected[:2]) and tuple(expected[:2]) != self.preprocess.size:
            raise CgilError(f"{self.bundle / 'manifest.json'}: preprocess size {list(self.preprocess.size)} does not "
                            f"match the image engine's input {list(expected[:2])} (edited manifest?)")
        self._swap = threading.Lock()
        self._head: Head = self._verified_head(self.bundle)
        self._text = None

    # ---- head -------------------------------------------------------------------------------
    @property
    def head(self) -> Head:
        return self._head

    def _verified_head(self, path: Path) -> Head:
        head = load_head(path, self.identity)
        return head.with_future() if self.include_future else head

    def load_head(self, path: str | Path | None = None) -> Head:
        """Swap in another head (a bundle, its heads/ folder or one version folder; default: heads/CURRENT).

        The new head is read and verified completely first; the swap is then one reference
        assignment, so a concurrent `predict` uses either the old or the new head, never a mix.
        """
        head = self._verified_head(Path(path) if path is not None else self.bundle)
        with self._swap:
            self._head = head
        return head

    # ---- images -----------------------------------------------------------------------------
    def pixels(self, images: Sequence[ImageLike]) -> np.ndarray:
        return self.preprocess.batch(list(images))

    def embed_pixels(self, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """uint8 (N, H, W, 3) at the model's size -> (N, D) L2-normalised embeddings."""
        h, w = self.preprocess.size
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (h, w, 3):
            raise CgilError(f"pixels must be uint8 (N, {h}, {w}, 3), got {pixels.dtype} {tuple(pixels.shape)}")
        limit = self.manifest.max_batch if self.backend.name == "tensorrt" else batch_size
        if len(pixels) == 0:
            return np.zeros((0, self.identity.embed_dim), np.float32)
        return np.concatenate([self.backend.embed(pixels[i:i + limit]) for i in range(0, len(pixels), limit)])

    def embed(self, images: Sequence[ImageLike]) -> np.ndarray:
        return self.embed_pixels(self.pixels(images))

    def predict(self, images: Sequence[ImageLike], top_k: int = 5) -> list[Prediction]:
        return self.classify(self.embed(images), top_k)

    def classify(self, embeddings: np.ndarray, top_k: int = 5, head: Optional[Head] = None) -> list[Prediction]:
        """Top-k labels, softmax scores and cosines per embedding; the one scoring code (serve's batcher too).

        `head`: a snapshot the caller already holds (the batcher scores a whole batch with one), else the current.
        """
        head = head or self._head  # read once: the whole batch is scored by the same head
        if head.num_classes == 0:
            raise CgilError(f"the head in {head.directory} has no classes")
        sims = embeddings @ head.keys.T
        logits = self.logit_scale * sims
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        k = max(1, min(int(top_k), head.num_classes))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [Prediction([head.class_names[j] for j in row], [float(probs[i, j]) for j in row],
                           [float(sims[i, j]) for j in row]) for i, row in enumerate(order)]

    # ---- class names without torch ----------------------------------------------------------
    def zero_shot_keys(self, names: Sequence[str]) -> np.ndarray:
        """Normalised zero-shot keys of new class names, from the bundle's text graph (no torch)."""
        from .text import TextEncoderRuntime

        if self._text is None:
            self._text = TextEncoderRuntime(self.bundle, self.manifest)
        z = self._text.zero_shot(names)
        return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)

    def add_class_names(self, names: Sequence[str]) -> Head:
        """Extend the current head with zero-shot keys of new names (in memory; swapped atomically)."""
        with self._swap:
            head = self._head
            names = clean_names(names, head.class_names)  # the one name rule (runtime.names)
            keys = self.zero_shot_keys(names)
            self._head = Head(np.concatenate([head.keys, keys]), head.class_names + list(names),
                              head.class_ids + [-1] * len(names), head.version, head.identity, head.directory)
            return self._head
