"""ffn-dist: the Feature Fusion Network for long-tailed recognition, distributed."""

__version__ = "0.2.0"
