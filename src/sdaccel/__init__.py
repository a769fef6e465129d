"""sdaccel: fast, lean Stable Diffusion inference with the cost of every trick measured."""

__version__ = "0.1.0"
