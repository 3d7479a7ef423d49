"""Drafters: what proposes tokens (kept apart from the acceptance rule that decides)."""

from .model import ModelDrafter
from .ngram import NGramDrafter

__all__ = ["ModelDrafter", "NGramDrafter"]
