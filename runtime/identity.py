"""`ModelIdentity`: what makes two CLIP image/text embeddings comparable.

One type for the learner (which computes it when it creates a model) and the runtime (which reads
it from a bundle's manifest and refuses heads made for another model). Torch-free.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, Union

from .errors import CgilError


@dataclass(frozen=True)
class ModelIdentity:
    model: str
    pretrained: Optional[str]  # open_clip tag, a checkpoint path, or None for seeded random weights
    weights_id: str  # "random:seed=S", "tag:<tag>" or "sha256:<hex of checkpoint file>"
    config_sha: str  # sha256 of the architecture JSON: an edited config is another model
    embed_dim: int
    image_size: int
    context_length: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "model identity") -> "ModelIdentity":
        """Parse and sanity-check an identity read from an untrusted file."""
        if not isinstance(d, dict):
            raise CgilError(f"{where}: the model identity is not a JSON object")
        missing = [f.name for f in fields(cls) if f.name not in d]
        if missing:
            raise CgilError(f"{where}: the model identity lacks {', '.join(missing)}")
        try:
            ident = cls(str(d["model"]), None if d["pretrained"] is None else str(d["pretrained"]),
                        str(d["weights_id"]), str(d["config_sha"]), int(d["embed_dim"]), int(d["image_size"]),
                        int(d["context_length"]))
        except (TypeError, ValueError) as e:
            raise CgilError(f"{where}: malformed model identity ({e})") from None
        if min(ident.embed_dim, ident.image_size, ident.context_length) <= 0:
            raise CgilError(f"{where}: embed_dim, image_size and context_length must be positive")
        return ident

    @classmethod
    def of(cls, value: Union["ModelIdentity", dict[str, Any]], where: str = "model identity") -> "ModelIdentity":
        return value if isinstance(value, cls) else cls.from_dict(value, where)

    @property
    def random_seed(self) -> int:
        """The seed of seeded random weights (0 for real weights)."""
        return int(self.weights_id.split("seed=")[1]) if self.weights_id.startswith("random:seed=") else 0

    def same_weights(self, other: "ModelIdentity") -> bool:
        return (self.model, self.weights_id, self.config_sha) == (other.model, other.weights_id, other.config_sha)

    def describe(self) -> str:
        return f"{self.model} ({self.weights_id}, config {self.config_sha})"
