"""Speculative Jacobi Decoding (SJD; Teng et al. 2024, arXiv 2410.01699): training-free drafting.

The drafter keeps a window of ``k`` guesses for the next tokens. Every verify forward evaluates
the target at all of them at once; after the acceptance rule has kept a prefix and produced the
recovered/bonus token, the guesses *after* it are refreshed by a Jacobi step: position ``i`` is
resampled from the target's distribution just computed there (conditioned on the old, partly
wrong guesses), and that distribution is remembered as the token's draft probability for the next
verification (SJD Alg. 1: "probabilistic parallel decoding"). Positions beyond what the last
forward covered are initialised fresh — uniformly at random, or, for images, by copying the token
one grid row above (``init="copy"``) — with a one-hot draft probability.

Lossless with exact acceptance: each guess is verified with the distribution it was drawn from
(one-hot for fresh guesses, which is exact for any fixed token: accept with p(x), otherwise
sample p without x). With greedy configs it reproduces greedy decoding token for token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..sampling import sample_from_probs
from ..types import Draft, DraftContext, PrefillOutput, Verdict


class JacobiDrafter:
    """SJD window drafter.

    Args:
        vocab_size: the target's vocabulary size.
        init: how fresh guesses are made: ``"random"`` (uniform) or ``"copy"`` (the token
            ``copy_offset`` positions earlier — the token above for an image of that width —
            falling back to random where that token is not known yet).
        copy_offset: grid width for ``init="copy"``.
    """

    def __init__(self, vocab_size: int, init: str = "random", copy_offset: int | None = None) -> None:
        if init not in ("random", "copy"):
            raise ValueError(f"init must be 'random' or 'copy', got {init!r}")
        if init == "copy" and (copy_offset is None or copy_offset < 1):
            raise ValueError("init='copy' needs copy_offset >= 1 (the image grid width)")
        self.vocab_size = vocab_size
        self.init = init
        self.copy_offset = copy_offset
        # Between steps: the distributions the next guesses come from ([B, k, V]) and which
        # window slots the last verify forward covered ([B, k]); resampled in draft(), which owns
        # the generator, so seeded runs are reproducible.
        self.window_probs: torch.Tensor | None = None
        self.covered: torch.Tensor | None = None

    def prefill(self, ctx: DraftContext, prompt, prefill: PrefillOutput) -> None:
        self.window_probs = None
        self.covered = None

    def verify_width(self, num_draft_tokens: int) -> int:
        return num_draft_tokens + 1  # the window is a chain

    def _fresh(self, ctx: DraftContext, offsets: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Fresh guesses ``[B, W]`` for the tokens ``offsets [B, W]`` positions after the history end."""
        random = torch.randint(0, self.vocab_size, offsets.shape, generator=generator, device=offsets.device)
        if self.init == "random":
            return random
        src = ctx.history_lengths[:, None] + offsets - self.copy_offset
        known = (src >= 0) & (src < ctx.history_lengths[:, None])
        return torch.where(known, ctx.history.gather(1, src.clamp(min=0)), random)

    def draft(self, ctx: DraftContext, num_draft_tokens: int, generator: torch.Generator | None) -> Draft:
        batch, device = ctx.last_tokens.shape[0], ctx.last_tokens.device
        offsets = torch.arange(num_draft_tokens, device=device).expand(batch, -1)
        fresh = self._fresh(ctx, offsets, generator)
        if self.window_probs is None or self.window_probs.shape[:2] != (batch, num_draft_tokens):
            return Draft(tokens=fresh, draft_probs=F.one_hot(fresh, self.vocab_size).float())
        jacobi = sample_from_probs(self.window_probs, generator)  # [B, k]
        tokens = torch.where(self.covered, jacobi, fresh)
        draft_probs = torch.where(self.covered[..., None], self.window_probs, F.one_hot(tokens, self.vocab_size).float())
        return Draft(tokens=tokens, draft_probs=draft_probs)

    def commit(self, ctx: DraftContext, verdict: Verdict) -> None:
        """Remember, for every next window slot, the target distribution the verify forward gave it."""
        k = ctx.target_probs.shape[1] - 1
        # Slot j stands for the token j places after the recovered/bonus one; the forward produced
        # a distribution for it iff its input index n + 1 + j is <= k.
        source = verdict.num_accepted[:, None] + 1 + torch.arange(k, device=ctx.target_probs.device)[None]
        self.covered = source <= k
        index = source.clamp(max=k)[..., None].expand(-1, -1, ctx.target_probs.shape[-1])
        self.window_probs = ctx.target_probs.gather(1, index)
