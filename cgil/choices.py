"""The learner's choice tuples and shared defaults, written once and torch-free.

cli.py validates `cgil train` flags against these before torch loads (a typo fails in a fraction of a
second), and the modules that act on a choice (train.py, generators/) check the same tuples. Imports
nothing: keep it that way, or the CLI's early checks start paying for torch.
"""
from __future__ import annotations

METHODS = ("cgil", "zeroshot", "joint", "sequential")
GENERATOR_KINDS = ("vae", "mog", "gauss", "diffusion")  # the keys of cgil.generators.GENERATORS, in this order
VAE_OBJECTIVES = ("reference", "textbook")  # cgil.generators.vae: z = mu + exp(s) eps (the reference's) | std = exp(logvar / 2)
MOG_ESTEPS = ("exact", "reference")  # cgil.generators.mog: Gaussian responsibilities | the reference code's weighting
DEFAULT_SEED = 1992  # class order and every learner RNG, for train, update and the benchmarks alike
