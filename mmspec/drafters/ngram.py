"""Prompt-lookup / n-gram drafting (Saxena 2023, "Prompt Lookup Decoding"; Fu et al. 2024, LADE).

Training-free: the drafter looks for the most recent earlier occurrence of the last ``n`` committed
tokens in the prompt + output history and proposes the tokens that followed it -- only those: a
continuation that runs into the end of the known history stops there, and a row without any match
proposes nothing. Proposals are deterministic, so ``draft_probs`` is None (one-hot proposals: exact
acceptance stays lossless).

Rows of a batch match different lengths, but a verify forward has one width. ``batch_width`` picks it:
``"min"`` (default) -- the shortest row's match, so no row verifies guesses it did not match (width 0
when any row found nothing: a plain decoding step); ``"max"`` -- the longest, rows with shorter matches
padding with their last token (verified like any draft, kept only if the target agrees). At batch 1
both are exactly "propose what matched". Choosing the width is the drafter's one host sync per step
(a shape); wrap it in :class:`~mmspec.drafters.AdaptiveWindow` to cap it from measured acceptance.
"""

from __future__ import annotations

import torch

from ..types import Draft, DraftContext, PrefillOutput, Verdict

BATCH_WIDTHS = ("min", "max")


class NGramDrafter:
    """Propose the continuation of the longest matching n-gram (``max_ngram`` down to ``min_ngram``).

    Args:
        vocab_size: the target's vocabulary size (checked against the target by the loop).
        max_ngram, min_ngram: lengths of the key n-gram tried, longest first. A match shorter than
            ``min_ngram`` proposes nothing: on open-ended text a single repeated token ("the", ",") is a
            poor predictor of what follows, and verifying its continuation costs more than it keeps.
        batch_width: ``"min"`` or ``"max"``: the draft width of a batch whose rows matched different
            lengths (module docstring).
    """

    def __init__(self, vocab_size: int, max_ngram: int = 3, min_ngram: int = 2, batch_width: str = "min") -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, max_ngram={max_ngram}")
        if batch_width not in BATCH_WIDTHS:
            raise ValueError(f"batch_width must be one of {BATCH_WIDTHS}, got {batch_width!r}")
        self.vocab_size = vocab_size
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.batch_width = batch_width

    def prefill(self, ctx: DraftContext, prompt, prefill: PrefillOutput) -> None:
        """Stateless: the history in ``ctx`` is all it needs."""

    def commit(self, ctx: DraftContext, verdict: Verdict) -> None:
        """Stateless."""

    def verify_width(self, num_draft_tokens: int) -> int:
        return num_draft_tokens + 1  # a chain of at most num_draft_tokens

    def draft(self, ctx: DraftContext, num_draft_tokens: int, generator: torch.Generator | None) -> Draft:
        """Up to ``num_draft_tokens`` tokens per row: ``[B, w]`` with ``w`` the matched length (``batch_width``)."""
        history, lengths = ctx.history, ctx.history_lengths  # [B, S], [B]
        batch, width = history.shape
        device = history.device
        start = torch.full((batch,), -1, dtype=torch.long, device=device)  # where the continuation starts
        for n in range(self.min_ngram, self.max_ngram + 1):  # longer n-grams overwrite shorter ones
            if width <= n:
                break
            key_index = (lengths[:, None] - n + torch.arange(n, device=device)[None]).clamp(min=0)
            key = history.gather(1, key_index)  # [B, n]
            windows = history.unfold(1, n, 1)  # [B, S - n + 1, n]
            pos = torch.arange(windows.shape[1], device=device)[None]
            # A match must end before the key starts and leave at least one following token.
            match = (windows == key[:, None, :]).all(-1) & (pos + n < lengths[:, None]) & (lengths[:, None] > n)
            latest = torch.where(match, pos, -1).amax(1)  # most recent occurrence, -1 if none
            start = torch.where(latest >= 0, latest + n, start)
        # Matched tokens per row: the continuation up to the end of the known history, at most k.
        matched = torch.where(start >= 0, (lengths - start).clamp(max=num_draft_tokens), 0)  # [B]
        pick = matched.amin() if self.batch_width == "min" else matched.amax()
        num = int(pick)  # deliberate host sync: the draft width is a shape, once per step
        offsets = torch.arange(num, device=device)[None]
        # Positions past a row's match (batch_width="max") repeat its last known token.
        index = torch.minimum(start[:, None].clamp(min=0) + offsets, lengths[:, None] - 1)
        index = torch.where(offsets < matched[:, None], index, lengths[:, None] - 1)
        return Draft(tokens=history.gather(1, index).clamp(min=0))
