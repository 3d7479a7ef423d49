"""Drafters: what proposes tokens (kept apart from the acceptance rule that decides)."""

from .jacobi import JacobiDrafter
from .model import ModelDrafter
from .ngram import NGramDrafter

__all__ = ["JacobiDrafter", "ModelDrafter", "NGramDrafter"]
