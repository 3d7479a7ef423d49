"""Drafters: what proposes tokens (kept apart from the acceptance rule that decides)."""

from .adaptive import AdaptiveWindow
from .eagle import EagleConfig, EagleDrafter, EagleHead
from .eagle3 import AuxFeatureTarget, Eagle3Config, Eagle3Drafter, Eagle3Head
from .jacobi import JacobiDrafter
from .model import ModelDrafter
from .ngram import NGramDrafter

__all__ = [
    "AdaptiveWindow",
    "AuxFeatureTarget",
    "Eagle3Config",
    "Eagle3Drafter",
    "Eagle3Head",
    "EagleConfig",
    "EagleDrafter",
    "EagleHead",
    "JacobiDrafter",
    "ModelDrafter",
    "NGramDrafter",
]
