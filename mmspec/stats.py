"""Statistics of one speculative (or baseline) generation call.

Counters stay on the device during the loop (no host sync); ``summary()`` / ``to_dict()`` read
them once at the end. Accepted length is reported both ways, and always says which:
``mean_accepted`` counts drafts kept per step (without the recovered/bonus token),
``mean_tokens_per_step`` counts every committed token (with it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .types import Verdict

#: Where each generated element came from (values of ``SpecStats.token_source`` and
#: ``Verdict.source``); ``SOURCE_NONE`` (-1) = nothing generated / committed there.
TOKEN_SOURCES = ("prefill", "accepted", "recovered", "bonus")
SOURCE_PREFILL, SOURCE_ACCEPTED, SOURCE_RECOVERED, SOURCE_BONUS = range(4)
SOURCE_NONE = -1


def prefix_sources(
    num_accepted: torch.Tensor,  # [...] drafts kept
    is_bonus: torch.Tensor,  # [...] bool: the final token is a bonus
    width: int,
) -> torch.Tensor:
    """``[..., width]`` where each element of a prefix verdict comes from: ``num_accepted`` accepted
    drafts, then the recovered or bonus token, then nothing (:data:`SOURCE_NONE`)."""
    j = torch.arange(width, device=num_accepted.device)
    n = num_accepted[..., None]
    last = torch.where(is_bonus, SOURCE_BONUS, SOURCE_RECOVERED)[..., None]
    return torch.where(j < n, SOURCE_ACCEPTED, torch.where(j == n, last, SOURCE_NONE))


@dataclass
class SpecStats:
    """Per-call counters.

    ``steps``: target forward passes in the decode loop (NFE), prefill excluded (``prefill_steps``).
    ``token_source`` / ``token_step``: ``[B, max_new_tokens]`` per generated token, its origin (see
    ``TOKEN_SOURCES``; -1 = not generated) and the decode step that committed it (0 = prefill):
    the raw material for acceptance heat-maps over an image's token grid.
    ``accepted_at_depth`` / ``proposed_at_depth``: ``[D]`` how often the draft at depth d was
    accepted / was reached (a draft is "reached" when all shallower drafts on its path were kept).
    ``row_steps``: ``[B]`` decode steps during which each row was still generating.
    ``row_accepted``: ``[B]`` drafts kept per row. ``moved_mass_sum`` / ``moved_mass_max`` /
    ``moved_mass_tokens``: for lossy rules, the total variation between the distribution each
    committed token was actually drawn from and the target's (``Verdict.moved_mass``), summed, its
    maximum, and how many tokens it covers (all zero for lossless rules). Wall times in seconds; ``draft_time``,
    ``verify_time`` (the target's forward) and ``accept_time`` (the acceptance rule and the commit of cache,
    outputs and drafter) are only measured with ``profile=True`` (they need device syncs).
    """

    batch_size: int
    num_draft_tokens: int
    max_new_tokens: int
    device: torch.device | str = "cpu"
    steps: int = 0
    prefill_steps: int = 1
    draft_time: float = 0.0
    verify_time: float = 0.0
    accept_time: float = 0.0
    total_time: float = 0.0
    token_source: torch.Tensor = field(init=False)
    token_step: torch.Tensor = field(init=False)
    accepted_at_depth: torch.Tensor = field(init=False)
    proposed_at_depth: torch.Tensor = field(init=False)
    row_steps: torch.Tensor = field(init=False)
    row_accepted: torch.Tensor = field(init=False)
    moved_mass_sum: torch.Tensor = field(init=False)
    moved_mass_max: torch.Tensor = field(init=False)
    moved_mass_tokens: torch.Tensor = field(init=False)
    #: Draft depth verified at each step of the causal loop (a host-side int per step: the chain's
    #: length, a tree's depth). Constant unless an adaptive window (``mmspec.drafters.adaptive``) chose it.
    draft_widths: list = field(init=False)
    #: Steps recorded by record_step and not yet folded into the counters (see flush).
    _pending: list = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        self.draft_widths = []
        shape = (self.batch_size, self.max_new_tokens)
        self.token_source = torch.full(shape, -1, dtype=torch.long, device=self.device)
        self.token_step = torch.full(shape, -1, dtype=torch.long, device=self.device)
        depth = max(self.num_draft_tokens, 1)
        self.accepted_at_depth = torch.zeros(depth, dtype=torch.long, device=self.device)
        self.proposed_at_depth = torch.zeros(depth, dtype=torch.long, device=self.device)
        self.row_steps = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        self.row_accepted = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        self.moved_mass_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.moved_mass_max = torch.zeros((), dtype=torch.float64, device=self.device)
        self.moved_mass_tokens = torch.zeros((), dtype=torch.long, device=self.device)

    def record_step(
        self,
        active: torch.Tensor,  # [B] bool: rows still generating during this step
        verdict: Verdict,  # a prefix verdict: num_accepted [B], is_bonus [B], tokens [B, D + 1], ...
        offsets: torch.Tensor,  # [B] index in the output where this step's first token lands
    ) -> None:
        """Account one verify step of the causal loop (sync-free). The step's tensors are kept and
        folded into the counters by :meth:`flush` in one vectorised pass for all steps (the loop's
        :meth:`trim` calls it): updating them here cost ~30 ops in every step, and deriving each
        step's sources ~14 more. ``offsets`` is copied, since the loop updates its tensor in place."""
        self.steps += 1
        self.draft_widths.append(verdict.tokens.shape[1] - 1)  # a shape, no sync
        self._pending.append((active, verdict, offsets.clone()))

    def flush(self) -> None:
        """Fold the steps recorded since the last flush into the counters (one pass, any number of steps)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        widths = [verdict.tokens.shape[1] for _, verdict, _ in pending]  # adaptive windows vary them per step
        width = max(widths)
        active = torch.stack([p[0] for p in pending])  # [S, B]
        num_accepted = torch.stack([verdict.num_accepted for _, verdict, _ in pending])  # [S, B]
        is_bonus = torch.stack([verdict.is_bonus for _, verdict, _ in pending])  # [S, B]
        # Every step's sources at once; a step past its own width derives SOURCE_NONE there
        # (num_accepted < its width), so only rules that give their sources need padding.
        source = prefix_sources(num_accepted, is_bonus, width)  # [S, B, W]
        for i, (_, verdict, _) in enumerate(pending):
            if verdict.source is not None:
                source[i] = F.pad(verdict.source, (0, width - widths[i]), value=SOURCE_NONE)
        offsets = torch.stack([p[2] for p in pending])  # [S, B]
        self.row_steps += active.sum(0)
        self.row_accepted += (num_accepted * active).sum(0)
        if self.num_draft_tokens:
            depth = torch.arange(self.accepted_at_depth.shape[0], device=num_accepted.device)
            # Depth d was proposed if the step drafted past it (adaptive windows and n-gram matches
            # draft fewer than D; a zero-width step proposes nothing) and it was reached.
            drafted = torch.tensor([w - 1 for w in widths], device=num_accepted.device)  # [S]
            reached = (depth <= num_accepted[..., None]) & (depth < drafted[:, None, None]) & active[..., None]
            self.proposed_at_depth += reached.sum((0, 1))
            self.accepted_at_depth += (reached & (depth != num_accepted[..., None])).sum((0, 1))
        # Steps commit disjoint output positions, so all of them are written in one scatter per buffer.
        for i, (act, verdict, _) in enumerate(pending):
            if verdict.moved_mass is not None:
                valid = act[:, None] & (source[i] != SOURCE_NONE)
                self.record_moved_mass(verdict.moved_mass, valid[:, : verdict.moved_mass.shape[1]])
        index = offsets[..., None] + torch.arange(width, device=source.device)  # [S, B, W]
        keep = active[..., None] & (source != SOURCE_NONE) & (index < self.max_new_tokens)
        first = self.steps - len(pending) + 1
        step = torch.arange(first, first + len(pending), device=source.device)[:, None, None].expand_as(index)
        index = index * keep  # entries not kept rewrite position 0 with its own value (only the prefill commits 0)

        def by_row(x: torch.Tensor) -> torch.Tensor:  # [S, B, W] -> [B, S * W]
            return x.transpose(0, 1).reshape(self.batch_size, -1)

        index, keep, source, step = map(by_row, (index, keep, source, step))
        self.token_source.scatter_(1, index, torch.where(keep, source, self.token_source.gather(1, index)))
        self.token_step.scatter_(1, index, torch.where(keep, step, self.token_step.gather(1, index)))

    def record_elements(
        self,
        mask: torch.Tensor,  # [B, N] bool: elements decided now
        source: torch.Tensor,  # [B, N] where each comes from (SOURCE_*)
        step: torch.Tensor | int,  # [B, N] or one step index: the target forward it was decided by
    ) -> None:
        """Set the source and step of output elements in place (the masked and block loops, where
        a later round may overwrite an earlier decision); sync-free."""
        self.token_source = torch.where(mask, source, self.token_source)
        self.token_step = torch.where(mask, torch.as_tensor(step, device=mask.device), self.token_step)

    def record_moved_mass(self, moved_mass: torch.Tensor, counted: torch.Tensor) -> None:
        """Add the TVDs ``moved_mass`` of the elements where ``counted`` (same shapes)."""
        mass = torch.where(counted, moved_mass.double(), 0.0)
        self.moved_mass_sum += mass.sum()
        self.moved_mass_max = torch.maximum(self.moved_mass_max, mass.max())
        self.moved_mass_tokens += counted.sum()

    def trim(self, lengths: torch.Tensor) -> None:
        """Forget tokens past each row's final length (``[B]``: max tokens or end of sequence):
        their sources and steps become -1 and ``row_accepted`` counts only the accepted drafts that
        are in the output (a step may accept drafts after an EOS, which are cut). Flushes first."""
        self.flush()
        past = torch.arange(self.max_new_tokens, device=lengths.device)[None] >= lengths[:, None]
        self.token_source.masked_fill_(past, -1)
        self.token_step.masked_fill_(past, -1)
        self.row_accepted = (self.token_source == SOURCE_ACCEPTED).sum(1)

    def leave_inference_mode(self) -> None:
        """Replace its tensors by normal copies: a loop that runs in inference mode fills them there, and
        inference tensors cannot be written in place outside it (a pipeline trims stats again). Flushes first."""
        self.flush()
        with torch.inference_mode(False):
            for f in fields(self):
                value = getattr(self, f.name)
                if isinstance(value, torch.Tensor):
                    setattr(self, f.name, value.clone())

    def record_prefill(self) -> None:
        """The first generated token of every row was sampled from the prefill output."""
        self.token_source[:, 0] = SOURCE_PREFILL
        self.token_step[:, 0] = 0

    # ------------------------------------------------------------------ reporting (host side)
    @property
    def mean_accepted(self) -> float:
        """Drafts kept per active step and row, WITHOUT the recovered/bonus token."""
        return float(self.row_accepted.sum()) / max(float(self.row_steps.sum()), 1.0)

    @property
    def mean_tokens_per_step(self) -> float:
        """Tokens committed per active step and row, WITH the recovered/bonus token."""
        return self.mean_accepted + 1.0

    @property
    def acceptance_rate_at_depth(self) -> list[float]:
        """P(draft at depth d kept | reached), for d = 0..D-1."""
        acc, prop = self.accepted_at_depth.tolist(), self.proposed_at_depth.tolist()
        return [a / p if p else 0.0 for a, p in zip(acc, prop)]

    @property
    def draft_acceptance_rate(self) -> float | None:
        """Kept drafts / proposed drafts over all depths (CSpD's acceptance rate); None when
        nothing was drafted (a baseline)."""
        proposed = int(self.proposed_at_depth.sum())
        return float(self.accepted_at_depth.sum()) / proposed if proposed else None

    def summary(self) -> dict:
        """Scalars for logs and benchmark records."""
        lossy = int(self.moved_mass_tokens) > 0
        profiled = bool(self.draft_time or self.verify_time)
        return {
            "batch_size": self.batch_size,
            "num_draft_tokens": self.num_draft_tokens,
            "steps": self.steps,
            "prefill_steps": self.prefill_steps,
            "mean_accepted_without_bonus": self.mean_accepted,
            "mean_tokens_per_step_with_bonus": self.mean_tokens_per_step,
            "acceptance_rate_at_depth": self.acceptance_rate_at_depth,
            # Phase times need device syncs, so they are measured only with profile=True: None (not a
            # misleading 0.0) otherwise, with a note saying so.
            "draft_time_s": self.draft_time if profiled else None,
            "verify_time_s": self.verify_time if profiled else None,
            "accept_time_s": self.accept_time if profiled else None,
            "other_time_s": (
                max(self.total_time - self.draft_time - self.verify_time - self.accept_time, 0.0) if profiled else None
            ),
            "total_time_s": self.total_time,
            **(
                {}
                if profiled
                else {"timing_note": "draft/verify/accept/other times are measured only with profile=True"}
            ),
            "mean_tvd_per_token": float(self.moved_mass_sum) / int(self.moved_mass_tokens) if lossy else None,
            "max_tvd_per_token": float(self.moved_mass_max) if lossy else None,
            "mean_draft_width": sum(self.draft_widths) / len(self.draft_widths) if self.draft_widths else None,
            "draft_width_counts": {str(w): self.draft_widths.count(w) for w in sorted(set(self.draft_widths))},
        }

    def to_dict(self) -> dict:
        """Everything, as JSON-serialisable lists."""
        return {
            **self.summary(),
            "token_source": self.token_source.tolist(),
            "token_step": self.token_step.tolist(),
            "token_source_names": list(TOKEN_SOURCES),
            "row_steps": self.row_steps.tolist(),
            "row_accepted": self.row_accepted.tolist(),
        }


@dataclass
class MaskedStats(SpecStats):
    """:class:`SpecStats` of the masked loop (:func:`mmspec.loops.masked_generate`), over the
    output's ``N`` elements.

    ``steps``: target forwards after the prefill (verifies + regeneration steps).
    ``token_source``: ``accepted`` (a kept draft), ``recovered`` (drawn by the rule or regenerated
    by the target) or ``prefill`` (element 0 regenerated from the prefill output); ``token_step``:
    the target forward that last decided the element. ``num_draft_tokens = N``:
    ``proposed_at_depth`` / ``accepted_at_depth`` count, per element, rows that drafted / kept it.
    ``row_accepted``: kept drafts per row. ``draft_steps``: drafter forwards (prefill included).
    ``rounds``: ``[B]`` verifies per row. ``converged``: ``[B]`` whether the row's last verify
    rejected nothing. ``num_regions``: connected regions the target regenerated (MuLo-SD's
    rejection islands), summed over rows and rounds.
    """

    draft_steps: int = 0
    num_regions: int = 0
    rounds: torch.Tensor = field(init=False)
    converged: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.rounds = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        self.converged = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)

    @property
    def resampled_fraction(self) -> float:
        """Share of the output's elements that came from the target rather than the draft."""
        generated = self.token_source >= 0
        return float((generated & (self.token_source != SOURCE_ACCEPTED)).sum()) / max(int(generated.sum()), 1)

    @property
    def mean_accepted(self) -> float:
        """Kept drafts per target forward and row."""
        return float(self.row_accepted.sum()) / max(self.steps * self.batch_size, 1)

    @property
    def mean_tokens_per_step(self) -> float:
        """Output elements per target forward (prefill excluded)."""
        return self.max_new_tokens / max(self.steps, 1)

    def summary(self) -> dict:
        return {
            **super().summary(),
            "draft_steps": self.draft_steps,
            "resampled_fraction": self.resampled_fraction,
            "mean_rounds": float(self.rounds.float().mean()),
            "converged_fraction": float(self.converged.float().mean()),
            "num_regions": self.num_regions,
        }


@dataclass
class BlockStats(SpecStats):
    """:class:`SpecStats` of the block loop (:func:`mmspec.loops.block_generate`), one element per
    block: ``token_source`` is ``prefill`` (forced to the target), ``accepted`` (the draft's block
    kept) or ``recovered`` (regenerated by the target). ``scores``: ``[B, num_blocks]`` the router's
    score of each drafted block (NaN where none was drafted). ``target_blocks`` / ``draft_blocks``:
    blocks generated by each model (summed over rows). Times (seconds): ``draft_time`` (drafting),
    ``route_time`` (decoding and scoring), ``verify_time`` (the target: cache writes and
    regeneration); all measured (a block loop step is long enough to time without a sync).
    ``decode_time``: the part of ``route_time`` a pipeline spent decoding drafted blocks for its
    scorer (the rest is scoring). ``target_forwards`` / ``draft_forwards``: model forwards (denoising
    steps and cache writes, one per batch) where the pipeline counts them.
    """

    target_blocks: int = 0
    draft_blocks: int = 0
    route_time: float = 0.0
    decode_time: float = 0.0
    target_forwards: int = 0
    draft_forwards: int = 0
    scores: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.scores = torch.full((self.batch_size, self.max_new_tokens), float("nan"), device=self.device)

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted blocks that were kept."""
        drafted = int(((self.token_source == SOURCE_ACCEPTED) | (self.token_source == SOURCE_RECOVERED)).sum())
        return float((self.token_source == SOURCE_ACCEPTED).sum()) / max(drafted, 1)

    def summary(self) -> dict:
        return {
            **super().summary(),
            "target_blocks": self.target_blocks,
            "draft_blocks": self.draft_blocks,
            "block_acceptance_rate": self.acceptance_rate,
            "route_time_s": self.route_time,
            "decode_time_s": self.decode_time,
            "score_time_s": self.route_time - self.decode_time,
            "target_forwards": self.target_forwards,
            "draft_forwards": self.draft_forwards,
        }
