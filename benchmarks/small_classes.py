"""Replay variance of small classes against VAE steps: why the folder: preset has `min_steps` (issue 17, item 16).

    python -m benchmarks.small_classes [--images 10 30] [--steps 50 100 150 200 300 500]

Writes a folder of generated 24x24 images (6 classes), embeds it with cgil-tiny (random weights), and for
each class size fits two classes' VAEs for each number of steps (a class of <= 64 images is one batch,
so passes = steps), printing the variance ratio of 1000 replayed embeddings against the real ones. As
controls: the `gauss` generator on the same features, and two disjoint real samples of one class.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def write_folder(root: Path, per_class: int, classes: int = 6) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / "train" / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray((rng.integers(0, 60, (24, 24, 3)) + 30 * c).clip(0, 255).astype(np.uint8)).save(d / f"{i}.png")
    return root


def main(argv: list[str] | None = None) -> None:
    import torch

    from cgil.clip import create_clip
    from cgil.data import get_dataset
    from cgil.features import task_features
    from cgil.generators import GeneratorConfig, make_generators
    from cgil.metrics import variance_ratio

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[10, 30], help="images per class")
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 100, 150, 200, 300, 500])
    parser.add_argument("--seed", type=int, default=1992)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    clip = create_clip()
    with tempfile.TemporaryDirectory() as tmp:
        ds = get_dataset(f"folder:{write_folder(Path(tmp), 2 * max(args.images))}", val_split=0.01)
        feats, labels = task_features(clip, ds, "train", [0, 1], None)

    def ratios(gen, fs) -> list[float]:
        sample = gen.sample(1000, torch.Generator().manual_seed(0))
        return [round(variance_ratio(sample[k].numpy(), f.numpy()), 3) for k, f in enumerate(fs)]

    for n in args.images:
        fs = [feats[labels == c][:n] for c in (0, 1)]
        other = [feats[labels == c][n:2 * n] for c in (0, 1)]
        real = [round(variance_ratio(o.numpy(), f.numpy()), 3) for o, f in zip(other, fs)]
        gauss = make_generators(GeneratorConfig(kind="gauss"), [0, 1], feats.shape[1])
        gauss.fit(fs, seed=args.seed)
        print(f"{n} images per class: real vs real {real}, gauss {ratios(gauss, fs)}", flush=True)
        for steps in args.steps:
            vae = make_generators(GeneratorConfig(passes=steps), [0, 1], feats.shape[1])
            start = time.perf_counter()
            vae.fit(fs, seed=args.seed)
            print(f"  vae {steps:4d} steps: variance ratio {ratios(vae, fs)} ({time.perf_counter() - start:.1f} s)",
                  flush=True)


if __name__ == "__main__":
    main()
