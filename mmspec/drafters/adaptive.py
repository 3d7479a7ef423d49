"""Adaptive draft windows: choose ``num_draft_tokens`` per step (per batch) from measured acceptance.

:class:`AdaptiveWindow` wraps any chain drafter (Jacobi / MC-SJD, a draft model, an EAGLE chain).
The loop's ``num_draft_tokens`` becomes the *maximum* width: ``verify_width`` answers for it, so the
cache, the history buffer and the stats are sized once, and every step's verify forward takes
``w + 1 <= k + 1`` tokens (a compiled target builds one graph per width it meets; the policies only
move by small steps, so few widths occur). Each step's width is recorded in
``SpecStats.draft_widths`` by the loop (and in ``AdaptiveWindow.widths``): the width actually drafted,
which a drafter may keep below the cap (the n-gram drafter proposes only what it matched).

Policies:

- ``"heuristic"`` — transformers' schedule for assisted generation
  (``AssistedCandidateGenerator.update_candidate_strategy``, ``num_assistant_tokens_schedule="heuristic"``):
  +2 after a step whose drafts were all accepted, -1 otherwise (a drafter that stopped short of the
  cap and was fully accepted leaves the cap unchanged). Per batch: a step counts as fully
  accepted when the active rows' mean accepted length reaches the width (at batch 1, exactly
  transformers' rule).
- ``"cost"`` — maximise committed tokens per second. Per width ``w`` it keeps exponentially weighted
  averages of the committed tokens per row and step ``T(w)`` (bonus/recovered included) and of the wall
  time of a whole step ``C(w)`` (time between consecutive ``draft`` calls: draft + verify + commit,
  closed by the loop's one host sync per step), and takes the width maximising ``T(w) / C(w)``.
  Widths not measured yet are estimated: ``T`` from per-depth acceptance rates ``a_d`` (P(draft at
  depth ``d`` kept | reached), prior 1/2) as ``1 + sum_{d<=w} prod_{j<=d} a_j`` (Leviathan et al.
  2023, Eq. 1 with per-depth rates), ``C`` from a line through the measured widths (slope >= 0), or
  with one measured width from the prior ``C(w) ∝ 1 + cost_slope * w``. ``T`` is measured per width,
  not derived from depth rates alone, because a Jacobi window's acceptance depends on its width
  (deeper guesses converge over the iterations they spend in the window). Widths come from a coarse
  grid (0, 1, 2, 4, 8, 12, 16, 24, ...; few shapes to compile; 0 = no draft, a plain target step,
  which wins when the drafts kept do not pay for drafting and the wider verify); every
  ``explore_every`` steps the less measured neighbour of the best width is tried (for ``w`` steps, at
  most three) so the estimates stay current. A drafter with a ``stateful_window`` (Jacobi: a guess
  improves over the iterations it spends in the window) needs time to settle after its width changes
  or a call starts with fresh guesses: for the first ``ceil(w / 2)`` steps at a new width ``w``
  (about the iterations a guess needs to reach the front of the window at two tokens per step) ``T``
  and the depth rates are not recorded, and a probe is held until three settled steps are measured —
  otherwise every probe of a wider window would be judged on its fresh guesses only and the policy
  would drift to narrow windows. Pass a ``memory`` dict (pipelines keep one per method and options)
  to carry what was learned across calls, per batch size.

Both are lossless: which drafts are proposed never changes what exact acceptance commits, and the
width is a function of past verdicts only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..types import Draft, DraftContext, PrefillOutput, Verdict

POLICIES = ("heuristic", "cost")


class AdaptiveWindow:
    """A chain drafter whose width is chosen per step.

    Args:
        drafter: the wrapped chain drafter (its ``draft(ctx, w, generator)`` must accept any ``w <= k``).
        policy: ``"heuristic"`` or ``"cost"`` (module docstring).
        min_width: the smallest width (>= 0); None: 0 for ``"cost"`` (it may skip drafting on steps
            where drafting does not pay — a plain target step; every chain drafter takes ``w = 0`` —
            e.g. with an untrained draft model that keeps almost nothing), 1 for ``"heuristic"``
            (transformers' schedule never drafts fewer than one token) and for drafters whose
            ``stateful_window`` is True (Jacobi: guesses converge over the steps they stay in the
            window, so a skipped step is no neutral probe; measured on the embedded LlamaGen, SJD's
            cost window settled on 0 and ran at 0.87x the baseline against 1.18x for the fixed window).
        initial: the first step's width (default: the maximum ``k``).
        cost_slope: prior relative cost of one more verified token (``c(w) ∝ 1 + cost_slope * w``),
            used until two widths have been measured; 0.1 matches a 2-core CPU at batch 1
            (ENVIRONMENT: 9 tokens cost 1.8x one), a GPU's is ~0.01.
        explore_every: ``"cost"``: try a neighbour width every this many steps (0: never).
        decay: weight of the past in the exponential averages of acceptance and cost.
        memory: a dict that keeps the ``"cost"`` tables across calls (one entry per batch size);
            None: learned afresh in every call.
        clock: seconds now (default ``time.perf_counter``; tests inject a synthetic one).
    """

    def __init__(
        self,
        drafter: Any,
        policy: str = "heuristic",
        min_width: int | None = None,
        initial: int | None = None,
        cost_slope: float = 0.1,
        explore_every: int = 8,
        decay: float = 0.9,
        memory: dict | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(
                f"window policy must be one of {POLICIES} (or 'fixed' in a method's options), got {policy!r}"
            )
        if min_width is None:
            min_width = 0 if policy == "cost" and not getattr(drafter, "stateful_window", False) else 1
        if min_width < 0 or (initial is not None and initial < min_width):
            raise ValueError(f"need 0 <= min_width <= initial, got min_width={min_width}, initial={initial}")
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if getattr(drafter, "tree", None) is not None or getattr(drafter, "num_alternatives", 1) > 1:
            raise ValueError("an adaptive window needs a chain drafter (this one drafts trees)")
        self.drafter = drafter
        self.policy = policy
        self.min_width = min_width
        self.initial = initial
        self.cost_slope = cost_slope
        self.explore_every = explore_every
        self.decay = decay
        self.clock = clock
        self.widths: list[int] = []  # every step's width, across calls
        self.memory = {} if memory is None else memory
        self._tables(0)
        self._reset()

    def _tables(self, batch_size: int) -> None:
        """Point the learned tables at ``memory[batch_size]`` (created empty)."""
        tables = self.memory.setdefault(
            batch_size, {"costs": {}, "tokens": {}, "counts": {}, "accepted": [], "reached": []}
        )
        self._costs: dict[int, float] = tables["costs"]  # width -> averaged seconds per step
        self._tokens: dict[int, float] = tables["tokens"]  # width -> averaged committed tokens per row and step
        self._counts: dict[int, int] = tables["counts"]  # width -> steps measured
        self._accepted: list[float] = tables["accepted"]  # per depth (index d - 1): weighted kept counts
        self._reached: list[float] = tables["reached"]  # weighted reached counts

    def _reset(self) -> None:
        self._width: int | None = None
        self._tick: float | None = None  # when the current step's draft started
        self._steps = 0
        self._probe = 0  # steps an exploration probe still holds its width
        self._settle = 0  # steps left before a stateful window's acceptance is representative again
        self._drafted: int | None = None  # the width of this call's previous draft

    def _settling_steps(self, width: int) -> int:
        """Steps a stateful window of ``width`` needs after a change before its acceptance is measured."""
        return -(-width // 2) if getattr(self.drafter, "stateful_window", False) else 0

    @property
    def vocab_size(self) -> int:
        return self.drafter.vocab_size

    def verify_width(self, num_draft_tokens: int) -> int:
        return self.drafter.verify_width(num_draft_tokens)  # the maximum sizes the cache

    def prefill(self, ctx: DraftContext, prompt: Any, prefill: PrefillOutput) -> None:
        self._tables(ctx.last_tokens.shape[0])
        self._reset()
        self.drafter.prefill(ctx, prompt, prefill)

    def draft(self, ctx: DraftContext, num_draft_tokens: int, generator) -> Draft:
        now = self.clock()
        if self._tick is not None and self.widths:  # the previous step, closed by the loop's sync
            w = self.widths[-1]
            seconds = now - self._tick
            old = self._costs.get(w)
            self._costs[w] = seconds if old is None else self.decay * old + (1 - self.decay) * seconds
        self._tick = now
        k = num_draft_tokens
        if self._width is None and (self.policy == "heuristic" or not self._tokens):
            self._width = self.initial if self.initial is not None else k
        elif self.policy == "cost":
            self._width = self._best_width(k)
        width = max(self.min_width, min(self._width, k))
        self._width = width
        self._steps += 1
        draft = self.drafter.draft(ctx, width, generator)
        # A drafter may stop short of the cap (n-gram: only what matched); the step's cost and
        # committed tokens belong to the width actually verified.
        self.widths.append(draft.num_draft_tokens)
        if draft.num_draft_tokens != self._drafted:  # a new width (or the call's first draft): fresh guesses
            self._settle = self._settling_steps(draft.num_draft_tokens)
            self._drafted = draft.num_draft_tokens
        return draft

    def commit(self, ctx: DraftContext, verdict: Verdict) -> None:
        self.drafter.commit(ctx, verdict)
        width = self.widths[-1]
        active = ctx.num_new > 0  # rows that committed this step
        # Deliberate host sync: the next width is a Python int (a shape).
        accepted = [int(n) for n, a in zip(verdict.num_accepted.tolist(), active.tolist()) if a]
        if not accepted:
            return
        if self.policy == "heuristic":
            full = sum(accepted) >= width * len(accepted)
            if width < self._width:  # the drafter stopped short of the cap: a full chain says nothing about it
                self._width = self._width if full else self._width - 1
            else:
                self._width = width + 2 if full else width - 1
            return
        if self._settle:  # a stateful window still settling: its acceptance is not yet its width's
            self._settle -= 1
            return
        tokens = sum(accepted) / len(accepted) + 1.0  # committed per row, bonus/recovered included
        old = self._tokens.get(width)
        self._tokens[width] = tokens if old is None else self.decay * old + (1 - self.decay) * tokens
        self._counts[width] = self._counts.get(width, 0) + 1
        while len(self._accepted) < width:
            self._accepted.append(0.0)
            self._reached.append(0.0)
        for d in range(width):  # depth d + 1 reached iff n >= d, kept iff n > d
            self._accepted[d] = self.decay * self._accepted[d] + sum(n > d for n in accepted)
            self._reached[d] = self.decay * self._reached[d] + sum(n >= d for n in accepted)

    # ------------------------------------------------------------------ the cost model
    def acceptance(self, depth: int) -> float:
        """Estimated P(draft at ``depth`` (1-based) kept | reached), with a prior of 1/2 (weight 1)."""
        if depth > len(self._accepted):
            return 0.5
        return (self._accepted[depth - 1] + 0.5) / (self._reached[depth - 1] + 1.0)

    def expected_tokens(self, width: int) -> float:
        """Committed tokens per row and step at width ``w`` (bonus/recovered included): measured when
        the width has run a few steps, else from the per-depth acceptance rates."""
        if self._counts.get(width, 0) >= 3:
            return self._tokens[width]
        total, chain = 1.0, 1.0
        for d in range(1, width + 1):
            chain *= self.acceptance(d)
            total += chain
        return total

    def cost(self, width: int) -> float:
        """Seconds per step at ``width``: measured, else a line through the measured widths, else the prior."""
        if width in self._costs:
            return self._costs[width]
        if not self._costs:
            return 1.0 + self.cost_slope * width
        ws = sorted(self._costs)
        if len(ws) == 1:
            w0 = ws[0]
            return self._costs[w0] * (1 + self.cost_slope * width) / (1 + self.cost_slope * w0)
        mean_w = sum(ws) / len(ws)
        mean_c = sum(self._costs[w] for w in ws) / len(ws)
        slope = sum((w - mean_w) * (self._costs[w] - mean_c) for w in ws) / sum((w - mean_w) ** 2 for w in ws)
        slope = max(slope, 0.0)
        return max(mean_c + slope * (width - mean_w), 1e-9)

    def candidates(self, k: int) -> list[int]:
        """The widths the ``"cost"`` policy chooses from: 1, 2, 4, 8, 12, 16, 24, 32, ... up to ``k`` (and
        ``k`` itself), at least ``min_width`` (and 0 when ``min_width`` is 0) — few distinct shapes (one
        compiled graph each)."""
        grid, w = [0, 1, 2, 4, 8], 12
        while w <= k:
            grid.append(w)
            w += 4 if w < 16 else 8
        return sorted({max(self.min_width, min(w, k)) for w in grid + [k]})

    def _best_width(self, k: int) -> int:
        candidates = self.candidates(k)
        if self._probe:  # hold an exploration probe for a few steps: a Jacobi window needs them to fill
            self._probe -= 1
            return self._width
        best = max(candidates, key=lambda w: self.expected_tokens(w) / self.cost(w))
        if self.explore_every and self._steps % self.explore_every == 0:
            i = candidates.index(best)
            neighbours = [candidates[j] for j in (i - 1, i + 1) if 0 <= j < len(candidates)]
            if neighbours:  # the less measured neighbour, held while a Jacobi window of its width fills
                probe = min(neighbours, key=lambda w: (self._counts.get(w, 0), -w))
                self._probe = min(2, max(probe - 1, 0)) + self._settling_steps(probe)
                return probe
        return best
