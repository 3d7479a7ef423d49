"""Block routers: rules that keep or hand back a whole drafted block before the target runs
(``commit = "block"``; run by :func:`mmspec.loops.block_generate`)."""

from __future__ import annotations

import math

import torch

from .acceptance import AcceptanceRule, register_acceptance_rule
from .types import CommitMode, Distribution, Draft, Scores, Verdict

AGGREGATES = ("min", "mean", "quantile")


def aggregate_scores(
    values: torch.Tensor,  # [B, F] a score per frame (or item) of each row's block
    aggregate: str = "min",
    quantile: float = 0.1,
) -> torch.Tensor:
    """One score per row ``[B]`` (float32) from per-frame scores: ``"min"`` (the worst frame,
    SDVG's choice), ``"mean"``, or ``"quantile"`` (the ``quantile``-th quantile of the row's frames,
    linear interpolation as :func:`torch.quantile`). The router and the video scorers both use it."""
    check_aggregate(aggregate, quantile)
    if values.dim() != 2:
        raise ValueError(f"frame scores must be [B, F], got shape {tuple(values.shape)}")
    values = values.float()
    if aggregate == "min":
        return values.amin(-1)
    if aggregate == "mean":
        return values.mean(-1)
    return values.quantile(quantile, dim=-1)


def check_aggregate(aggregate: str, quantile: float) -> None:
    """``ValueError`` unless ``aggregate`` is one of :data:`AGGREGATES` and ``quantile`` is in [0, 1]."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be a number in [0, 1], got {quantile!r}")


@register_acceptance_rule
class ScoreThresholdRouter(AcceptanceRule):
    """SDVG's router (arXiv 2604.17397): a drafted block is kept when the aggregate of its frames'
    quality scores (``Scores.values [B, F]``) is ``>= tau``; otherwise the target regenerates it.
    ``aggregate``: ``"min"`` (the worst frame, SDVG's choice), ``"mean"`` or ``"quantile"`` (the
    ``quantile`` of the frame scores). ``tau = +inf`` hands every block back (target-only output),
    ``tau = -inf`` keeps every block (draft-only output after the forced ones).

    Lossy with no distributional bound: the output mixes target and draft blocks; its quality is
    reported by the scores themselves (``BlockStats.scores``) and measured against target-only.
    """

    name = "score-threshold"
    lossless = False
    bound = "no distributional bound; every kept block's aggregate score is >= tau"
    commit = CommitMode.BLOCK
    distribution = Scores

    def __init__(self, tau: float, aggregate: str = "min", quantile: float = 0.1) -> None:
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or math.isnan(tau):
            raise ValueError(f"tau must be a number (+-inf allowed), got {tau!r}")
        check_aggregate(aggregate, quantile)
        self.tau, self.aggregate, self.quantile = float(tau), aggregate, quantile

    def __repr__(self) -> str:
        return f"ScoreThresholdRouter(tau={self.tau}, aggregate={self.aggregate!r}, quantile={self.quantile})"

    def verify(self, draft: Draft, target: Distribution | None, generator: torch.Generator | None) -> Verdict:
        if not isinstance(target, Scores):
            raise TypeError(f"{self.name!r} routes on frame scores (mmspec.types.Scores), got {type(target).__name__}")
        score = aggregate_scores(target.values, self.aggregate, self.quantile)  # [B]
        return Verdict.block(draft.tokens, score >= self.tau, scores=score)
