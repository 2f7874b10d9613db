"""Alignment cost as seen classes grow: the reference's softmax over all C classes vs sampled negatives.

Every alignment step of the reference computes the keys of all C seen classes through the text
transformer, and an epoch has ~C*S/B steps, so an epoch costs O(C^2) text passes (the README's
31 CPU-hours at 200 classes for ViT-B-16). `AlignConfig.negatives = M` computes per step only the
keys of the batch's own classes plus M others drawn at random (sampled softmax): at most B + M keys,
so an epoch grows linearly in C once C > B + M.

Setting: the ViT-B-16 text tower with seeded random weights (no download), synthetic class features
(one random direction per class plus noise, D = 512) used directly as the alignment source (no
generator, so only alignment is timed), the same epochs and learning rate for both variants. Reports
CPU seconds per epoch and the accuracy of the learned keys on held-out features of every class.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Optional, Sequence

import torch

from benchmarks.common import add_out_option, add_threads_option, apply_threads, log, machine, markdown_table, write_results


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cgil bench alignment", description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, nargs="+", default=[10, 50, 200], help="seen-class counts C")
    p.add_argument("--negatives", type=int, default=32, help="M of the sampled variant")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--train-per-class", type=int, default=64, help="alignment features per class (S)")
    p.add_argument("--test-per-class", type=int, default=32)
    p.add_argument("--model", default="ViT-B-16", help="text tower (random weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="cgil-tiny's text tower, C = 10 and 40, 1 epoch: a smoke run")
    add_threads_option(p)
    add_out_option(p)
    return p.parse_args(argv)


def class_features(c: int, dim: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(centres, features, labels): unit class directions plus isotropic noise of comparable norm."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(c, dim, generator=g), dim=-1)
    labels = torch.arange(c).repeat_interleave(n)
    return centres, centres[labels] + 0.05 * torch.randn(len(labels), dim, generator=g), labels


def measure(clip, c: int, negatives: Optional[int], args, names: Sequence[str]) -> dict[str, Any]:
    from cgil.generators import GeneratorConfig
    from cgil.learner import AlignConfig, Learner

    dim = clip.identity.embed_dim
    centres, train, train_y = class_features(c, dim, args.train_per_class, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    test_y = torch.arange(c).repeat_interleave(args.test_per_class)
    test = centres[test_y] + 0.05 * torch.randn(len(test_y), dim, generator=g)
    torch.manual_seed(args.seed)  # the context generator's init: the same for both variants
    learner = Learner(clip, GeneratorConfig(kind="gauss"),
                      AlignConfig(epochs=args.epochs, lr=args.lr, negatives=negatives))
    learner.add_classes(list(range(c)), names[:c], seed=args.seed)
    marks = [time.process_time()]
    learner.align(Learner.real_source(train, train_y), seed=args.seed,
                  progress=lambda done, total: marks.append(time.process_time()))
    per_epoch = [b - a for a, b in zip(marks, marks[1:])]
    with torch.no_grad():
        pred = (torch.nn.functional.normalize(test, dim=-1) @ learner.head().t()).argmax(1)
    steps = -(-len(train_y) // learner.align_cfg.batch_size)
    return {"classes": c, "variant": "all classes (reference)" if negatives is None else f"sampled, M={negatives}",
            "steps_per_epoch": steps, "epoch_cpu_s": statistics.mean(per_epoch[1:] or per_epoch),  # first: warm-up
            "accuracy": 100.0 * float((pred == test_y).float().mean())}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse(argv)
    apply_threads(args.threads)
    from benchmarks.update import class_names, text_only_clip

    if args.quick:
        import cgil.clip  # noqa: F401  (registers cgil-tiny with open_clip)
        args.model, args.classes, args.epochs, args.negatives = "cgil-tiny", [10, 40], 1, 8
        args.train_per_class, args.test_per_class = 16, 8
    clip = text_only_clip(args.model, args.seed)
    names = class_names(max(args.classes), clip.tokenizer)
    rows = []
    for c in args.classes:
        for negatives in (None, args.negatives):
            row = measure(clip, c, negatives, args, names)
            rows.append(row)
            log(f"C={c:4d} {row['variant']:24s} epoch {row['epoch_cpu_s']:7.2f} CPU-s  accuracy {row['accuracy']:.1f}%")
        full, sampled = rows[-2], rows[-1]
        sampled["epoch_speedup_x"] = full["epoch_cpu_s"] / sampled["epoch_cpu_s"]
        sampled["accuracy_diff_points"] = sampled["accuracy"] - full["accuracy"]
    command = "cgil bench alignment " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command.strip(), "threads": torch.get_num_threads(), "model": args.model,
            "settings": {k: v for k, v in vars(args).items() if k not in ("out_dir",)},
            "notes": ["epoch_cpu_s: mean CPU time of one alignment epoch (keys, backward, AdamW) over the epochs",
                      "accuracy: nearest key (cosine) on held-out features of all C classes after the epochs",
                      "the sampled variant falls back to all classes on a step whose batch classes + M cover C"]}
    name = "alignment" + ("-quick" if args.quick else "")
    path = write_results(name, rows, meta, out_dir=args.out_dir, columns=COLUMNS)
    text = render(rows, meta)
    path.with_suffix(".md").write_text(f"Machine: {machine()}\n\n" + text)
    print(text)
    return {"json": str(path), "rows": rows}


COLUMNS = ["classes", "variant", "steps_per_epoch", "epoch_cpu_s", "epoch_speedup_x", "accuracy",
           "accuracy_diff_points"]


def render(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    return (f"# alignment cost vs seen classes: all-class softmax vs sampled negatives\n\nCommand: "
            f"`{meta['command']}`\n\n" + markdown_table(rows, COLUMNS) + "\n"
            + "\n".join(f"- {n}" for n in meta["notes"]) + "\n")


if __name__ == "__main__":
    main()
