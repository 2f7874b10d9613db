"""Run configuration as data. `TrainConfig` is written to config.json and compared on --resume."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from .choices import DEFAULT_SEED, METHODS  # noqa: F401  (METHODS: `from cgil.config import METHODS` stays valid)
from .clip import DEFAULT_MODEL
from runtime.errors import CgilError
from .generators import GeneratorConfig
from .learner import AlignConfig

# `--preset paper`: the CGIL paper's benchmarks, run with the reference hyperparameters (spec section 5).
PAPER_DATASETS = ("imagenet-r", "cars196", "cub200", "eurosat-rgb", "isic")
PRESET_NAMES = ("paper",)

# Dataset presets: the reference hyperparameters of the paper (lr, epochs, VAE passes) and ours
# for the offline digits demo, sized to finish all four methods in minutes on two CPU cores.
PRESETS: dict[str, dict[str, Any]] = {
    "digits": {"align": {"lr": 0.03, "epochs": 20}, "generator": {"passes": 100}},
    # Any `folder:` dataset (a user's own images). Sized for a CPU device from the accuracy/time
    # curve on digits (benchmarks/results/defaults-digits-*.md): 10-100 passes score within seed
    # noise of each other (32.6-34.9%) while CPU time grows with them, so 50; fewer than 20 epochs
    # lose points (5: 26.3%, 10: 29.9%, 20: 34.6%).
    # min_steps: 50 passes over a class that fits one batch are 50 VAE steps, too few (its replay collapses,
    # issue 17 item 16); small classes get 300 steps, larger ones are unchanged. An explicit --passes wins.
    "folder": {"align": {"lr": 0.03, "epochs": 20}, "generator": {"passes": 50, "min_steps": 300}},
    "imagenet-r": {"align": {"lr": 0.05, "epochs": 60}, "generator": {"passes": 500}},
    "cars196": {"align": {"lr": 0.03, "epochs": 60}, "generator": {"passes": 500}},
    "cub200": {"align": {"lr": 0.01, "epochs": 60}, "generator": {"passes": 500}},
    "eurosat-rgb": {"align": {"lr": 0.03, "epochs": 150}, "generator": {"passes": 500}},
    "isic": {"align": {"lr": 0.05, "epochs": 150}, "generator": {"passes": 750}},
}


def preset_key(dataset: str) -> str:
    """The PRESETS entry of a --dataset: its name, or "folder" for every folder:PATH."""
    return "folder" if dataset.startswith("folder:") else dataset


@dataclass
class TrainConfig:
    dataset: str = "digits"
    data_dir: Optional[str] = None
    model: str = DEFAULT_MODEL
    pretrained: Optional[str] = None
    model_seed: int = 0  # seed of the random weights when no --pretrained is given
    method: str = "cgil"
    tasks: Optional[int] = None  # None: the dataset's reference split
    seed: int = DEFAULT_SEED  # class order and every learner RNG
    device: str = "cpu"
    n_ctx: int = 1
    feature_batch_size: int = 64
    preset: Optional[str] = None  # "paper": reference hyperparameters of the dataset (recorded in config.json)
    val_split: Optional[float] = None  # folder: without test/: the share of each class held out as test
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    align: AlignConfig = field(default_factory=AlignConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        kw["generator"] = GeneratorConfig.from_dict(d.get("generator", {}))
        kw["align"] = AlignConfig(**d.get("align", {}))
        return cls(**kw)

    @classmethod
    def for_dataset(cls, dataset: str, preset: Optional[str] = None, **overrides: Any) -> "TrainConfig":
        """Defaults with the dataset's preset applied (if any), then explicit overrides.

        `preset="paper"` demands the reference settings: the paper's generic ones (VAE, S = 256,
        batches of 128, AdamW without weight decay, one context token: this class's defaults) and the
        dataset's lr / epochs / VAE passes; it refuses a dataset the paper has no values for.
        Explicit overrides still win and are recorded next to `preset` in config.json.
        """
        if preset is not None and preset not in PRESET_NAMES:
            raise CgilError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESET_NAMES)}")
        if preset == "paper" and dataset not in PAPER_DATASETS:
            raise CgilError(f"--preset paper: the paper has no reference hyperparameters for {dataset!r}; "
                            f"its benchmarks are {', '.join(PAPER_DATASETS)}")
        values = PRESETS.get(preset_key(dataset), {})
        cfg = cls(dataset=dataset, preset=preset)
        for k, v in values.get("align", {}).items():
            setattr(cfg.align, k, v)
        for k, v in values.get("generator", {}).items():
            setattr(cfg.generator, k, v)
        for k, v in overrides.items():
            if k in ("epochs", "lr"):
                setattr(cfg.align, k, v)
            elif k in ("generator", "passes"):
                setattr(cfg.generator, "kind" if k == "generator" else k, v)
                if k == "passes":  # the passes asked for, exactly: no preset floor under them
                    cfg.generator.min_steps = 0
            else:
                setattr(cfg, k, v)
        return cfg


def differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable list of settings that differ between two config dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} (run) vs {vb!r} (now)")
    return out
