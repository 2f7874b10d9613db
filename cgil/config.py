"""Run configuration as data. `TrainConfig` is written to config.json and compared on --resume."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from .clip import DEFAULT_MODEL
from .generators import GeneratorConfig
from .learner import AlignConfig

METHODS = ("cgil", "zeroshot", "joint", "sequential")

# Dataset presets: the reference hyperparameters of the paper (lr, epochs, VAE passes) and ours
# for the offline digits demo, sized to finish all four methods in minutes on two CPU cores.
PRESETS: dict[str, dict[str, Any]] = {
    "digits": {"align": {"lr": 0.03, "epochs": 20}, "generator": {"passes": 100}},
    "imagenet-r": {"align": {"lr": 0.05, "epochs": 60}, "generator": {"passes": 500}},
    "cars196": {"align": {"lr": 0.03, "epochs": 60}, "generator": {"passes": 500}},
    "cub200": {"align": {"lr": 0.01, "epochs": 60}, "generator": {"passes": 500}},
    "eurosat-rgb": {"align": {"lr": 0.03, "epochs": 150}, "generator": {"passes": 500}},
    "isic": {"align": {"lr": 0.05, "epochs": 150}, "generator": {"passes": 750}},
}


@dataclass
class TrainConfig:
    dataset: str = "digits"
    data_dir: Optional[str] = None
    model: str = DEFAULT_MODEL
    pretrained: Optional[str] = None
    model_seed: int = 0  # seed of the random weights when no --pretrained is given
    method: str = "cgil"
    tasks: Optional[int] = None  # None: the dataset's reference split
    seed: int = 1992  # class order and every learner RNG
    device: str = "cpu"
    n_ctx: int = 1
    feature_batch_size: int = 64
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
    def for_dataset(cls, dataset: str, **overrides: Any) -> "TrainConfig":
        """Defaults with the dataset's preset applied (if any), then explicit overrides."""
        preset = PRESETS.get(dataset, {})
        cfg = cls(dataset=dataset)
        for k, v in preset.get("align", {}).items():
            setattr(cfg.align, k, v)
        for k, v in preset.get("generator", {}).items():
            setattr(cfg.generator, k, v)
        for k, v in overrides.items():
            if k in ("epochs", "lr"):
                setattr(cfg.align, k, v)
            elif k in ("generator", "passes"):
                setattr(cfg.generator, "kind" if k == "generator" else k, v)
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
