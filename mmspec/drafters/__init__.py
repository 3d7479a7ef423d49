"""Drafters: what proposes tokens (kept apart from the acceptance rule that decides)."""

from .adaptive import AdaptiveWindow
from .eagle import EagleConfig, EagleDrafter, EagleHead
from .jacobi import JacobiDrafter
from .model import ModelDrafter
from .ngram import NGramDrafter

__all__ = ["AdaptiveWindow", "EagleConfig", "EagleDrafter", "EagleHead", "JacobiDrafter", "ModelDrafter", "NGramDrafter"]
