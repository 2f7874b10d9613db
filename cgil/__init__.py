"""cgil: continual learning for a frozen CLIP with generative replay of image embeddings (CGIL).

Entry points: `cgil.train.run` (a benchmark run), `cgil.learner.Learner` (one task update),
`cgil.clip.create_clip` (the frozen model), `cgil.data.get_dataset` (datasets).
"""
from runtime.errors import CgilError

__version__ = "0.1.0"  # the only copy: pyproject.toml and `cgil --version` read it; CHANGELOG.md names it
__all__ = ["CgilError", "__version__"]
