"""The image path in PyTorch eager, as a runtime backend: cross-checks ONNX Runtime and TensorRT.

It rebuilds the frozen CLIP from the bundle's model identity, so it needs torch and the learner
package; the runtime never imports it. `cgil predict/serve --backend torch` reach it because the
CLI registers it (runtime.backends.register_backend); in code, pass an instance to Classifier.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cgil.clip import create_clip
from runtime.bundle import BundleManifest
from runtime.errors import CgilError

from .onnx_export import ImageGraph


class TorchImage:
    name = "torch"

    def __init__(self, manifest: BundleManifest):
        ident = manifest.identity
        clip = create_clip(ident.model, ident.pretrained, "cpu", ident.random_seed)
        if not clip.identity.same_weights(ident):
            raise CgilError(f"the torch backend rebuilt {clip.identity.describe()}, not the bundle's {ident.describe()}")
        pre = manifest.preprocess
        self.graph = ImageGraph(clip.model, pre["mean"], pre["std"]).eval()
        self.providers = ["torch-cpu"]

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.graph(torch.from_numpy(np.ascontiguousarray(pixels))).numpy()


def torch_backend(bundle: Path, manifest: BundleManifest) -> TorchImage:
    return TorchImage(manifest)
