"""Speculative Jacobi Decoding (SJD; Teng et al. 2024, arXiv 2410.01699) and its coupled variant
MC-SJD (So et al. 2025, arXiv 2510.24211, "Maximal Coupling Speculative Jacobi Decoding"):
training-free drafting.

The drafter keeps a window of ``k`` guesses for the next tokens. Every verify forward evaluates
the target at all of them at once; after the acceptance rule has kept a prefix and produced the
recovered/bonus token, the guesses *after* it are refreshed by a Jacobi step: position ``i`` is
redrawn from the target's distribution just computed there (conditioned on the old, partly wrong
guesses), and that distribution is remembered as the token's draft probability for the next
verification (SJD Alg. 1: "probabilistic parallel decoding"). Positions beyond what the last
forward covered are initialised fresh — uniformly at random, or, for images, by copying the token
one grid row above (``init="copy"``) — with a one-hot draft probability.

How the redraw is made is the ``coupling``:

- ``"none"`` (SJD): an independent draw from the new distribution ``q_t``. Even when ``q_t`` barely
  moved, the token re-rolls, so the tokens after it see a new context and the window does not settle.
- ``"maximal"`` (MC-SJD: the draft of a position is sampled maximally coupled with its draft of the
  previous iteration; equation numbers not cited: only the paper's abstract and summaries could be
  read here, the coupling itself is the standard maximal coupling of two categoricals): keep the
  previous draft ``y ~ q_{t-1}`` of the same position with probability ``min(1, q_t(y) / q_{t-1}(y))``,
  otherwise draw from the residual ``norm(max(0, q_t - q_{t-1}))``. ``P(x_t = x_{t-1}) = 1 - TV(q_t, q_{t-1})``,
  the largest any coupling allows.
- ``"gumbel"``: the Gumbel-max coupling with noise shared across iterations: each position draws its
  exponential race noise ``E ~ Exp(1)^V`` once, when it enters the window, and every redraw is
  ``argmax(q_t / E)`` (= ``argmax(log q_t + G)``, ``G = -log E`` Gumbel). No extra uniform, no residual;
  ``P(x_t = x_{t-1}) >= (1 - TV) / (1 + TV)`` (Daliri et al. 2024 bound for Gumbel coupling).

Losslessness (proof sketch; ``docs/DESIGN.md`` "Drafters" has it at more length). Exact chain
acceptance (Leviathan et al. 2023, Thm. 1) commits a token distributed as the target ``p`` at a
position whenever the draft ``x`` there, *conditionally on everything the rule has seen before that
position* (committed tokens, earlier drafts, their verdicts, ``p``), is distributed as the draft
probability ``q`` the rule is given. (i) Everything computed about positions ``< i`` — drafts, target
distributions over them, verdicts — depends only on the randomness of positions ``< i`` and on the
rule's own uniforms: the target is causal, the rule stops at the first rejection, and a position is
never examined by a verdict before it is committed. (ii) The sequence of proposals ``q_1, q_2, ..``
of position ``i`` is such a function (the target's distribution at ``i`` given the guesses before
``i``). (iii) The randomness of position ``i`` — fresh guess, coupling uniforms, residual draws, or its
Gumbel noise ``E_i`` — is drawn independently of all that. So conditionally on (i), position ``i`` is a
Markov chain driven by the exogenous ``q``'s whose state has law ``q_t`` at every iteration: for the
maximal coupling by induction (``P(x_t = a) = min(q_{t-1}(a), q_t(a)) + max(0, q_t(a) - q_{t-1}(a)) = q_t(a)``),
for the Gumbel coupling directly (``argmax(q_t / E)`` with ``E`` independent of ``q_t`` is an exact
draw from ``q_t``). Hence every draft the rule sees has the law it is told, and exact acceptance is
lossless, as for SJD (``coupling="none"``: fresh independent draws). What would break it is reusing
the previous token without the ``min(1, q_t/q_{t-1})`` correction while reporting ``q_t``: then the
draft follows ``q_{t-1}``, not ``q_t``; ``tests/core/test_mcsjd.py`` shows such a coupling fails the
distribution test that the real ones pass. With a greedy configuration all distributions are
one-hot and every variant reproduces greedy decoding token for token. Relaxed rules (LANTERN, GSD)
read the same ``(x, q)`` pairs, so their stated bounds hold unchanged.
"""

from __future__ import annotations

import torch

from ..kernels.rows import gather_rows
from ..sampling import sample_from_probs
from ..types import Draft, DraftContext, PrefillOutput, Verdict

COUPLINGS = ("none", "maximal", "gumbel")


def maximal_coupling(
    prev_tokens: torch.Tensor,  # [B, W] y, drawn from prev_probs
    prev_probs: torch.Tensor,  # [B, W, V] q_{t-1}, the distribution y was drawn from
    new_probs: torch.Tensor,  # [B, W, V] q_t
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A draw ``x ~ q_t`` maximally coupled with ``y ~ q_{t-1}`` (MC-SJD, arXiv 2510.24211): keep ``y``
    with probability ``min(1, q_t(y) / q_{t-1}(y))``, else draw from ``norm(max(0, q_t - q_{t-1}))``.
    Returns ``(x [B, W], kept [B, W] bool)``."""
    q_prev = prev_probs.gather(-1, prev_tokens[..., None])[..., 0]  # [B, W] > 0: y was drawn from it
    q_new = new_probs.gather(-1, prev_tokens[..., None])[..., 0]
    uniform = torch.rand(q_prev.shape, generator=generator, device=q_prev.device)
    kept = uniform * q_prev < q_new
    residual = (new_probs - prev_probs).clamp(min=0)  # [B, W, V]
    # The residual is empty only when q_t == q_{t-1}, where y is always kept; rounding can leave it
    # empty with y rejected: then q_t itself is the exact fallback (a measure-zero event in exact arithmetic).
    empty = residual.sum(-1, keepdim=True) <= 0
    redraw = sample_from_probs(torch.where(empty, new_probs, residual), generator)
    return torch.where(kept, prev_tokens, redraw), kept


def gumbel_coupling(
    new_probs: torch.Tensor,  # [B, W, V] q_t
    noise: torch.Tensor,  # [B, W, V] Exp(1) noise of each position, drawn once when it entered the window
) -> torch.Tensor:
    """``argmax(q_t / E)``: an exact draw from ``q_t`` that reuses the position's own race noise, so the
    draw changes only where ``q_t`` moved enough to change the winner. Returns ``[B, W]``."""
    return sample_from_probs(new_probs, exp_noise=noise)


class JacobiDrafter:
    """SJD window drafter, optionally coupled across iterations (MC-SJD).

    Args:
        vocab_size: the target's vocabulary size.
        init: how fresh guesses are made: ``"random"`` (uniform) or ``"copy"`` (the token
            ``copy_offset`` positions earlier — the token above for an image of that width —
            falling back to random where that token is not known yet).
        copy_offset: grid width for ``init="copy"``.
        coupling: how a position's guess is redrawn from the new target distribution: ``"none"``
            (SJD, independent), ``"maximal"`` (MC-SJD) or ``"gumbel"`` (shared race noise); see the
            module docstring. All are lossless with exact acceptance.

    ``num_coupled`` / ``num_kept`` (tensors, read at the end): redrawn positions that had a previous
    guess (fresh or drawn), and how many kept it; ``num_coupled_drawn`` / ``num_kept_drawn``: the same
    for previous guesses that were themselves drawn from a target distribution — the paper's token
    stability across iterations (with ``"maximal"``, its mean is ``E[1 - TV(q_t, q_{t-1})]``).
    """

    #: Guesses improve over the steps they stay in the window, so an adaptive window does not skip
    #: drafting by default (a skipped step empties the window: :class:`~.adaptive.AdaptiveWindow`).
    stateful_window = True

    def __init__(
        self, vocab_size: int, init: str = "random", copy_offset: int | None = None, coupling: str = "none"
    ) -> None:
        if init not in ("random", "copy"):
            raise ValueError(f"init must be 'random' or 'copy', got {init!r}")
        if init == "copy" and (copy_offset is None or copy_offset < 1):
            raise ValueError("init='copy' needs copy_offset >= 1 (the image grid width)")
        if coupling not in COUPLINGS:
            raise ValueError(
                f"coupling must be one of {COUPLINGS} ('none' = SJD, 'maximal' / 'gumbel' = MC-SJD), got {coupling!r}"
            )
        self.vocab_size = vocab_size
        self.init = init
        self.copy_offset = copy_offset
        self.coupling = coupling
        self._reset()

    def _reset(self) -> None:
        # State for the window slots of the next draft (slot j = the token j places after the new
        # `last`), all [B, S, ...] with S = the last draft's width; resampled in draft(), which owns
        # the generator, so seeded runs are reproducible:
        self.window_probs: torch.Tensor | None = None  # [B, S, V] target distribution computed for the slot
        self.covered: torch.Tensor | None = None  # [B, S] the last forward computed one
        self.prev_tokens: torch.Tensor | None = None  # [B, S] the slot's previous guess
        self.prev_probs: torch.Tensor | None = None  # [B, S, V] the distribution it was drawn from
        self.has_prev: torch.Tensor | None = None  # [B, S] it had one (it was in the last window)
        self.noise: torch.Tensor | None = None  # [B, S, V] Exp(1) race noise per position (gumbel)
        self._draft: Draft | None = None  # the last draft (its tokens and proposals become prev_*)
        self._drawn: torch.Tensor | None = None  # [B, w] its slots drawn from a target distribution
        self.prev_drawn: torch.Tensor | None = None  # [B, S] the slot's previous guess was such a draw
        self._stability: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # per step, see _count

    def prefill(self, ctx: DraftContext, prompt, prefill: PrefillOutput) -> None:
        self._reset()

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

    @staticmethod
    def _fit(x: torch.Tensor | None, width: int, fill) -> torch.Tensor | None:
        """``x [B, S, ...]`` cut or padded with ``fill`` to ``[B, width, ...]`` (the window may change width)."""
        if x is None or x.shape[1] == width:
            return x
        if x.shape[1] > width:
            return x[:, :width]
        pad = x.new_full((x.shape[0], width - x.shape[1], *x.shape[2:]), fill)
        return torch.cat([x, pad], 1)

    def draft(self, ctx: DraftContext, num_draft_tokens: int, generator: torch.Generator | None) -> Draft:
        batch, device, w = ctx.last_tokens.shape[0], ctx.last_tokens.device, num_draft_tokens
        offsets = torch.arange(w, device=device).expand(batch, -1)
        fresh = self._fresh(ctx, offsets, generator)
        if self.coupling == "gumbel":
            # Noise of positions new to the window; surviving positions keep theirs (shifted in commit).
            new = torch.empty(batch, w, self.vocab_size, device=device).exponential_(1.0, generator=generator)
            old = self._fit(self.noise, w, float("nan"))
            self.noise = new if old is None else torch.where(torch.isnan(old), new, old)
        if self.window_probs is None or self.window_probs.shape[0] != batch:
            # One-hot proposals of the fresh guesses; a scatter, not F.one_hot, which reads the ids'
            # range back to the host (two syncs per step).
            one_hot = torch.zeros(batch, w, self.vocab_size, device=device).scatter_(-1, fresh[..., None], 1.0)
            self._draft = Draft(tokens=fresh, draft_probs=one_hot)
            self._drawn = torch.zeros_like(fresh, dtype=torch.bool)
            return self._draft
        covered = self._fit(self.covered, w, False)  # [B, w]
        # [B, w, V]: the computed distributions, one-hot at the fresh guess in uncovered slots. A product
        # and a scatter-add, not a where against a one-hot [B, w, V]: 2.5x cheaper or more at V = 16,384
        # (benchmarks/row_reads.py); the same values, as probabilities are finite (p * 0 = 0, p + 0 = p).
        probs = (self._fit(self.window_probs, w, 0.0) * covered[..., None]).scatter_add_(
            -1, fresh[..., None], (~covered)[..., None].to(self.window_probs.dtype)
        )
        if self.coupling == "gumbel":
            redraw = gumbel_coupling(probs, self.noise)
            has_prev = self._fit(self.has_prev, w, False) & covered
            self._count(has_prev, self._fit(self.prev_drawn, w, False), redraw == self._fit(self.prev_tokens, w, 0))
        elif self.coupling == "maximal":
            has_prev = self._fit(self.has_prev, w, False) & covered
            prev_tokens = torch.where(has_prev, self._fit(self.prev_tokens, w, 0), 0)
            prev_probs = torch.where(has_prev[..., None], self._fit(self.prev_probs, w, 0.0), probs)
            coupled, kept = self.couple(prev_tokens, prev_probs, probs, generator)
            redraw = torch.where(has_prev, coupled, sample_from_probs(probs, generator))
            self._count(has_prev, self._fit(self.prev_drawn, w, False), kept)
        else:
            redraw = sample_from_probs(probs, generator)  # [B, w]
        tokens = torch.where(covered, redraw, fresh)
        self._drawn = covered
        self._draft = Draft(tokens=tokens, draft_probs=probs)  # q where covered, one-hot elsewhere (above)
        return self._draft

    def couple(
        self,
        prev_tokens: torch.Tensor,
        prev_probs: torch.Tensor,
        new_probs: torch.Tensor,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``"maximal"`` redraw of guesses ``prev_tokens [B, w]`` drawn from ``prev_probs [B, w, V]``
        given the new distributions ``new_probs [B, w, V]``: :func:`maximal_coupling` (a test overrides
        it with a deliberately wrong coupling, which must fail the distribution test)."""
        return maximal_coupling(prev_tokens, prev_probs, new_probs, generator)

    def _count(self, has_prev: torch.Tensor, drawn: torch.Tensor, kept: torch.Tensor) -> None:
        """Keep one step's stability masks (all ``[B, w]`` bool) for the counters, which sum them when
        read: summing here cost 12 ops per step."""
        self._stability.append((has_prev, drawn, kept))

    def _stability_sum(self, with_drawn: bool, with_kept: bool) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.long)
        for has_prev, drawn, kept in self._stability:
            mask = has_prev & drawn if with_drawn else has_prev
            total = total.to(mask.device) + (mask & kept if with_kept else mask).sum()
        return total

    @property
    def num_coupled(self) -> torch.Tensor:
        return self._stability_sum(with_drawn=False, with_kept=False)

    @property
    def num_kept(self) -> torch.Tensor:
        return self._stability_sum(with_drawn=False, with_kept=True)

    @property
    def num_coupled_drawn(self) -> torch.Tensor:
        return self._stability_sum(with_drawn=True, with_kept=False)

    @property
    def num_kept_drawn(self) -> torch.Tensor:
        return self._stability_sum(with_drawn=True, with_kept=True)

    def commit(self, ctx: DraftContext, verdict: Verdict) -> None:
        """Shift the window past the committed tokens: remember, for every next slot, the target
        distribution the verify forward gave it and (couplings) the guess it held and its proposal."""
        k = ctx.target_probs.shape[1] - 1  # width of the draft just verified
        # Slot j stands for the token j places after the recovered/bonus one: draft index n + 1 + j,
        # whose distribution the forward produced at input index n + 1 + j iff that is <= k.
        source = verdict.num_accepted[:, None] + 1 + torch.arange(k, device=ctx.target_probs.device)[None]  # [B, k]
        self.covered = source <= k
        self.window_probs = gather_rows(ctx.target_probs, source.clamp(max=k))
        if self.coupling == "none" or self._draft is None:
            return
        self.has_prev = source < k  # the slot's position was in the window just verified
        prev = source.clamp(max=k - 1)
        self.prev_tokens = self._draft.tokens.gather(1, prev)
        self.prev_drawn = self._drawn.gather(1, prev) & self.has_prev
        self.prev_probs = gather_rows(self._draft.draft_probs, prev)
        if self.coupling == "gumbel":
            noise = gather_rows(self.noise, prev)
            self.noise = torch.where(self.has_prev[..., None], noise, float("nan"))  # NaN: draw anew
