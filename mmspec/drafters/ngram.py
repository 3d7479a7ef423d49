"""Prompt-lookup / n-gram drafting (Saxena 2023, "Prompt Lookup Decoding"; Fu et al. 2024, LADE).

Training-free: the drafter looks for the most recent earlier occurrence of the last ``n`` committed
tokens in the prompt + output history and proposes the tokens that followed it. Proposals are
deterministic, so ``draft_probs`` is None (one-hot proposals: exact acceptance stays lossless).
Everything is vectorised over the batch and free of host syncs.
"""

from __future__ import annotations

import torch

from ..types import Draft, DraftContext, PrefillOutput, Verdict


class NGramDrafter:
    """Propose continuations of the longest matching n-gram (``max_ngram`` down to ``min_ngram``).

    Args:
        vocab_size: the target's vocabulary size (checked against the target by the loop).
        max_ngram, min_ngram: lengths of the key n-gram tried, longest first.

    Rows without any match propose their last token repeated (cheap to verify, usually rejected).
    """

    def __init__(self, vocab_size: int, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, max_ngram={max_ngram}")
        self.vocab_size = vocab_size
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def prefill(self, ctx: DraftContext, prompt, prefill: PrefillOutput) -> None:
        """Stateless: the history in ``ctx`` is all it needs."""

    def commit(self, ctx: DraftContext, verdict: Verdict) -> None:
        """Stateless."""

    def verify_width(self, num_draft_tokens: int) -> int:
        return num_draft_tokens + 1  # a chain

    def draft(self, ctx: DraftContext, num_draft_tokens: int, generator: torch.Generator | None) -> Draft:
        history, lengths = ctx.history, ctx.history_lengths  # [B, S], [B]
        batch, width = history.shape
        # Default: repeat the last token.
        start = torch.full((batch,), -1, dtype=torch.long, device=history.device)
        for n in range(self.min_ngram, self.max_ngram + 1):  # longer n-grams overwrite shorter ones
            if width <= n:
                break
            key_index = (lengths[:, None] - n + torch.arange(n, device=history.device)[None]).clamp(min=0)
            key = history.gather(1, key_index)  # [B, n]
            windows = history.unfold(1, n, 1)  # [B, S - n + 1, n]
            pos = torch.arange(windows.shape[1], device=history.device)[None]
            # A match must end before the key starts and leave at least one following token.
            match = (windows == key[:, None, :]).all(-1) & (pos + n < lengths[:, None]) & (lengths[:, None] > n)
            latest = torch.where(match, pos, -1).amax(1)  # most recent occurrence, -1 if none
            start = torch.where(latest >= 0, latest + n, start)
        offsets = torch.arange(num_draft_tokens, device=history.device)[None]
        # Copy the continuation; positions past the known history repeat the last known token.
        index = torch.where(start[:, None] >= 0, start[:, None] + offsets, lengths[:, None] - 1)
        index = torch.minimum(index, lengths[:, None] - 1)
        tokens = history.gather(1, index)
        return Draft(tokens=tokens.clamp(min=0))
