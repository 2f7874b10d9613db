"""The CGIL learner state: frozen CLIP, prompts of every seen class, and the generator replay store.

One task update is: `add_classes` -> `fit_generators` (new classes only) -> `align` (prompts of all
seen classes on synthetic replay) -> `head()`. The baselines reuse the same steps with a different
source of alignment data (real features, or none).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .clip import FrozenClip
from .generators import ClassGenerators, GeneratorConfig, load_generators, make_generators
from .metrics import REPLAY_SAMPLES, replay_quality
from .prompts import PromptLearner
from .text import TextEncoder, normalize

Progress = Optional[Callable[[int, int], None]]
# A source of alignment data: given an RNG, one epoch's (features (N, D), dataset class ids (N,)).
Source = Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class AlignConfig:
    epochs: int = 60
    lr: float = 0.03
    batch_size: int = 128
    samples_per_class: int = 256  # S: fresh synthetic samples per class per epoch
    weight_decay: float = 0.0
    # None (the reference): every step's softmax runs over the keys of all C seen classes, so an epoch of
    # ~2C steps costs O(C^2) text passes. M: over the batch's own classes plus M other classes drawn
    # at random each step (sampled softmax), O(C * (B + M)) per epoch. docs/design.md measures both.
    negatives: Optional[int] = None

    def to_dict(self) -> dict:
        return asdict(self)


class FlatParameters:
    """The trainable tensors as views of one flat buffer, which the optimizer updates as a single tensor.

    AdamW is elementwise, so one update of the flat buffer is the update of every tensor, bit for bit
    (tests/test_text_fast.py); on the CPU, torch's foreach AdamW otherwise calls each of its ~10 operations
    once per tensor (15 for cgil's prompts). On CUDA foreach AdamW is already one multi-tensor kernel per
    operation, so `flatten=False` there leaves the tensors and the optimizer as they were.
    `release` gives every tensor its own storage back (a saved state must not carry the whole buffer).
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], flatten: bool = True):
        self.params = list(params)
        self.flat = torch.cat([p.detach().reshape(-1) for p in self.params]).requires_grad_() if flatten else None
        offset = 0
        for p in self.params if flatten else ():
            p.data = self.flat.data[offset:offset + p.numel()].view_as(p)
            offset += p.numel()

    def tensors(self) -> list[torch.Tensor]:
        """What the optimizer updates."""
        return self.params if self.flat is None else [self.flat]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def gather_grads(self) -> None:
        # every prompt tensor reaches the loss, so each has a gradient (AdamW skips a tensor without one,
        # which a flat buffer could not)
        if self.flat is not None:
            self.flat.grad = torch.cat([p.grad.reshape(-1) for p in self.params])

    def release(self) -> None:
        for p in self.params if self.flat is not None else ():
            p.data = p.data.clone()


class Learner:
    def __init__(self, clip: FrozenClip, gen_cfg: GeneratorConfig, align_cfg: AlignConfig, n_ctx: int = 1,
                 truncate_text: bool = True):
        self.clip = clip
        self.gen_cfg = gen_cfg
        self.align_cfg = align_cfg
        self.text = TextEncoder(clip.model, clip.tokenizer, truncate=truncate_text)
        self.prompts = PromptLearner(self.text, clip.identity.embed_dim, n_ctx).to(clip.device)
        self.store: list[ClassGenerators] = []  # one batched group per task

    @property
    def device(self) -> torch.device:
        return self.clip.device

    @property
    def class_ids(self) -> list[int]:
        return self.prompts.class_ids

    @property
    def class_names(self) -> list[str]:
        return self.prompts.class_names

    def columns(self, class_ids: torch.Tensor) -> torch.Tensor:
        """Dataset class ids -> head column indices."""
        lut = torch.full((max(self.class_ids) + 1,), -1, dtype=torch.long)
        lut[torch.tensor(self.class_ids)] = torch.arange(len(self.class_ids))
        cols = lut[class_ids.cpu()]
        if (cols < 0).any():
            raise ValueError("features of a class the learner has not seen")
        return cols

    def add_classes(self, class_ids: Sequence[int], names: Sequence[str], seed: int) -> None:
        self.prompts.add_classes(class_ids, names, torch.Generator().manual_seed(seed))

    def fit_generators(self, class_ids: Sequence[int], feats: torch.Tensor, labels: torch.Tensor, seed: int,
                       progress: Progress = None) -> dict:
        """Fit the new classes' generators as one batched model and add them to the replay store."""
        group = make_generators(self.gen_cfg, class_ids, feats.shape[1])
        per_class = [feats[labels == c].to(self.device) for c in class_ids]
        # Checked here with the class names, so an error says "coins", not "class 2".
        name_of = dict(zip(self.class_ids, self.class_names))
        group.check_sizes(per_class, [repr(name_of.get(c, f"class {c}")) for c in class_ids])
        stats = group.fit(per_class, seed=seed, progress=progress)
        self.store.append(group)
        return stats

    @torch.no_grad()
    def replay_quality(self, group: ClassGenerators, feats: torch.Tensor, labels: torch.Tensor, seed: int,
                       samples: int = REPLAY_SAMPLES) -> dict[str, dict]:
        """Per class of `group`: variance ratio and Frechet distance of `samples` generated embeddings
        against the class's real features. Draws from its own RNG, so it changes no other result."""
        generated = group.sample(samples, torch.Generator().manual_seed(derive_seed(seed, 104729))).cpu()
        return {str(c): replay_quality(generated[k].numpy(), feats[labels == c].cpu().float().numpy())
                for k, c in enumerate(group.class_ids)}

    def add_generators(self, class_ids: Sequence[int], state: dict[str, torch.Tensor], dim: int) -> None:
        self.store.append(load_generators(self.gen_cfg, class_ids, dim, state).to(self.device))

    def replay_source(self) -> Source:
        """S fresh samples from the generator of every class in the store."""
        s = self.align_cfg.samples_per_class

        def draw(rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            feats, ids = [], []
            for group in self.store:
                samples = group.sample(s, rng)  # (K, S, D)
                feats.append(samples.reshape(-1, samples.shape[-1]))
                ids.append(torch.tensor(group.class_ids).repeat_interleave(s))
            return torch.cat(feats), torch.cat(ids)

        return draw

    @staticmethod
    def real_source(feats: torch.Tensor, labels: torch.Tensor) -> Source:
        return lambda rng: (feats, labels)

    def align(self, source: Source, seed: int, progress: Progress = None) -> dict:
        """Train the prompts of all seen classes and g with cross-entropy on cosine logits."""
        flat = FlatParameters(self.prompts.trainable_parameters(), flatten=self.device.type == "cpu")
        try:
            return self._align(source, seed, progress, flat)
        finally:
            flat.release()

    def _align(self, source: Source, seed: int, progress: Progress, flat: "FlatParameters") -> dict:
        cfg = self.align_cfg
        # foreach: the same update as the default per-tensor loop, bit for bit (tests/test_align_speed.py); on
        # one flat tensor (FlatParameters) each of its operations is one kernel, not one per tensor
        opt = torch.optim.AdamW(flat.tensors(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
        rng = torch.Generator().manual_seed(seed)
        scale = self.clip.logit_scale
        self.prompts.train()
        loss = torch.zeros(())
        for epoch in range(cfg.epochs):
            feats, ids = source(rng)
            feats = normalize(feats.to(self.device).float())
            cols_host = self.columns(ids)
            cols = cols_host.to(self.device)
            order_host = torch.randperm(len(cols), generator=rng)
            order = order_host.to(self.device)
            for start in range(0, len(order), cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                rows = None
                if cfg.negatives is not None:
                    rows, target = self.sampled_classes(cols_host[order_host[start:start + cfg.batch_size]], rng)
                if rows is not None and len(rows) < self.prompts.num_classes:
                    logits = scale * feats.index_select(0, idx) @ self.prompts.keys(rows).t()
                    loss = F.cross_entropy(logits, target.to(self.device))
                else:  # the reference: a softmax over every seen class
                    logits = scale * feats.index_select(0, idx) @ self.prompts.keys().t()  # (cheaper than [idx])
                    loss = F.cross_entropy(logits, cols[idx])
                flat.zero_grad()
                loss.backward()
                flat.gather_grads()
                opt.step()
            if progress:
                progress(epoch + 1, cfg.epochs)
        self.prompts.eval()
        return {"final_loss": float(loss.detach())}

    def sampled_classes(self, batch_cols: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(head columns whose keys this step computes, the batch's targets among them): the batch's own
        classes, then `negatives` others drawn without replacement. Host tensors: no device sync."""
        present = torch.unique(batch_cols)  # sorted
        others = torch.ones(self.prompts.num_classes, dtype=torch.bool)
        others[present] = False
        pool = others.nonzero().squeeze(1)
        negatives = pool[torch.randperm(len(pool), generator=rng)[: self.align_cfg.negatives]]
        return torch.cat([present, negatives]), torch.searchsorted(present, batch_cols)

    @torch.no_grad()
    def head(self) -> torch.Tensor:
        """(C, D) normalised keys of the seen classes, in arrival order."""
        return self.prompts.keys().detach()

    def store_state(self) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """Flat tensors and a JSON index of the replay store, one entry per task group."""
        tensors, index = {}, []
        for g, group in enumerate(self.store):
            for k, v in group.state_dict().items():
                tensors[f"group{g}.{k}"] = v.detach().cpu().contiguous()
            index.append({"group": g, "kind": group.kind, "class_ids": group.class_ids, "dim": group.dim})
        return tensors, index

    def load_store(self, tensors: dict[str, torch.Tensor], index: list[dict]) -> None:
        self.store = []
        for entry in index:
            prefix = f"group{entry['group']}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            self.add_generators(entry["class_ids"], state, entry["dim"])
