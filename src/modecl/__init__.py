"""modecl: continual learning of unified multimodal generative models (MoDE and baselines)."""

__version__ = "0.1.0"
