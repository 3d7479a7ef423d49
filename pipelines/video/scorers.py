"""Frame scorers for SDVG's router, by name, and the helpers around them.

``get_frame_scorer(name, **options)`` builds one of :data:`FRAME_SCORERS`:

- ``"vlm"`` (:class:`~.scorer_vlm.VLMCaptionScorer`): VQAScore-style, the mean log-probability per
  token that an mmspec VLM assigns to the prompt as the answer about the frame (offline with the
  embedded emoji captioner);
- ``"classifier"`` (:class:`~.scorer_classifier.ClassifierFrameScorer`): the log-probability a small
  CNN trained on real frames of the model's classes gives the prompt's class (the embedded pair's
  calibrated scorer: a few milliseconds per block on a CPU core);
- ``"clip"`` (:class:`~.scorer_clip.CLIPFrameScorer`): CLIP score through ``open_clip`` with weights
  from a user path;
- ``"imagereward"`` (:class:`~.scorer_imagereward.ImageRewardScorer`): the ImageReward model (package
  ``image-reward``) or any object with its ``score(prompt, images)`` interface.

:func:`aggregate_frame_scores` turns ``[B, F]`` frame scores into one score per block exactly as the
``"score-threshold"`` router does (it is the router's function), and :func:`calibrate_tau` picks τ
from a percentile of target-generated blocks' aggregated scores.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mmspec.routers import AGGREGATES, aggregate_scores

from . import scorer_classifier, scorer_clip, scorer_imagereward, scorer_vlm  # noqa: F401  (each registers its scorer)
from .scorer_base import FRAME_SCORERS, FrameScorer, check_frames, register_frame_scorer

__all__ = [
    "AGGREGATES",
    "FRAME_SCORERS",
    "FrameScorer",
    "aggregate_frame_scores",
    "calibrate_tau",
    "check_frames",
    "get_frame_scorer",
    "register_frame_scorer",
]

#: The router's aggregation (one implementation): ``[B, F]`` frame scores -> ``[B]`` block scores.
aggregate_frame_scores = aggregate_scores


def get_frame_scorer(name: str | FrameScorer, **options: Any) -> FrameScorer:
    """The scorer called ``name`` built with ``options`` (or ``name`` itself if it already is a
    scorer), e.g. ``get_frame_scorer("clip", model_name="ViT-B-32", weights="clip.pt")``.

    Raises:
        ValueError: unknown name (the message lists the registered ones) or an option the scorer
            does not take (the message lists its options).
    """
    if isinstance(name, FrameScorer):
        if options:
            raise ValueError("pass options either to the scorer's constructor or by name, not both")
        return name
    if name not in FRAME_SCORERS:
        raise ValueError(f"unknown frame scorer {name!r}; available: {sorted(FRAME_SCORERS)}")
    cls = FRAME_SCORERS[name]
    unknown = sorted(set(options) - set(cls.option_names()))
    if unknown:
        raise ValueError(
            f"frame scorer {name!r} has no option(s) {', '.join(unknown)}; its options: {', '.join(cls.option_names())}"
        )
    return cls.from_options(**options)


def calibrate_tau(block_scores: torch.Tensor | np.ndarray | list[float], percentile: float = 10.0) -> float:
    """SDVG's threshold from target-generated blocks: the ``percentile``-th percentile (linear
    interpolation, as ``numpy.percentile``) of their aggregated scores (one per block, e.g.
    :func:`aggregate_frame_scores` of the scorer's frame scores with the router's aggregate).

    With τ at the p-th percentile, about p % of the target's own blocks would fail the router: a
    drafted block is kept only if it scores at least as well as the target's worst p % do. Higher p
    = stricter (closer to target-only quality, fewer drafts kept).

    Raises:
        ValueError: no scores, non-finite scores, or ``percentile`` outside [0, 100].
    """
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be a number in [0, 100], got {percentile!r}")
    if isinstance(block_scores, torch.Tensor):
        values = block_scores.detach().double().reshape(-1).cpu()
    else:
        values = torch.from_numpy(np.asarray(block_scores, dtype=np.float64).reshape(-1))
    if values.numel() == 0:
        raise ValueError("calibrate_tau needs the scores of at least one target-generated block")
    if not torch.isfinite(values).all():
        raise ValueError("calibrate_tau got non-finite block scores (NaN marks a block that was not scored)")
    return float(torch.quantile(values, percentile / 100.0))
