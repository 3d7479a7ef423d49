"""Acceptance rules: given a draft and the target's distributions, decide what to keep.

Rules are the analogue of diffusers schedulers: swappable without touching the loop. Each states
``lossless`` and, if lossy, the ``bound`` it guarantees. Look them up by name through
:func:`get_acceptance_rule`; add one with :func:`register_acceptance_rule`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar

import torch

from .kernels import chain_rejection_sample, tree_rejection_sample
from .types import Draft, Verdict

ACCEPTANCE_RULES: dict[str, type["AcceptanceRule"]] = {}


def register_acceptance_rule(cls: type["AcceptanceRule"]) -> type["AcceptanceRule"]:
    """Class decorator: make a rule available by its ``name``."""
    ACCEPTANCE_RULES[cls.name] = cls
    return cls


def get_acceptance_rule(rule: "str | AcceptanceRule", **kwargs) -> "AcceptanceRule":
    """An instance of the rule called ``rule`` (or ``rule`` itself if it already is one)."""
    if isinstance(rule, AcceptanceRule):
        if kwargs:
            raise ValueError("pass options either to the rule's constructor or by name, not both")
        return rule
    if rule not in ACCEPTANCE_RULES:
        raise ValueError(f"unknown acceptance rule {rule!r}; available: {sorted(ACCEPTANCE_RULES)}")
    return ACCEPTANCE_RULES[rule](**kwargs)


class AcceptanceRule(ABC):
    """Decides, row by row, how many draft tokens to keep and which token follows them.

    ``verify(draft, target_probs, generator)`` takes ``target_probs`` ``[B, k + 1, V]`` for a chain
    (index i = the target's distribution after the committed prefix and the first i drafts) or
    ``[B, N, V]`` for a tree (index n = distribution after node n, node 0 = root).
    """

    name: ClassVar[str]
    lossless: ClassVar[bool]
    #: What the rule guarantees about the output distribution, in words.
    bound: ClassVar[str]
    #: True if the rule is only meaningful for greedy decoding (temperature 0 / top_k 1).
    requires_greedy: ClassVar[bool] = False

    @abstractmethod
    def verify(self, draft: Draft, target_probs: torch.Tensor, generator: torch.Generator | None) -> Verdict:
        """Return the :class:`~mmspec.types.Verdict` for ``draft`` under ``target_probs``."""


def _greedy_tree_walk(
    draft: Draft, choose: Callable[[torch.Tensor], torch.Tensor], target_probs: torch.Tensor
) -> Verdict:
    """Follow the tree from the root, at each node taking the first child whose token equals
    ``choose(target_probs at that node)``; stop when none does. Vectorised over rows."""
    tree = draft.tree
    batch = draft.tokens.shape[0]
    rows = torch.arange(batch, device=draft.tokens.device)
    best = choose(target_probs)  # [B, N]
    cur = torch.zeros(batch, dtype=torch.long, device=rows.device)
    alive = torch.ones(batch, dtype=torch.bool, device=rows.device)
    accepted_nodes = torch.full((batch, tree.max_depth), -1, dtype=torch.long, device=rows.device)
    tokens = torch.full((batch, tree.max_depth + 1), -1, dtype=torch.long, device=rows.device)
    num_accepted = torch.zeros(batch, dtype=torch.long, device=rows.device)
    for depth in range(tree.max_depth):
        kids = tree.children[rows, cur]  # [B, C]
        kid_tokens = draft.tokens.gather(1, kids.clamp(min=0))
        match = (kids >= 0) & (kid_tokens == best[rows, cur][:, None])
        first = match.float().argmax(1)  # index of the first matching child
        hit = alive & match.any(1)
        nxt = kids[rows, first]
        accepted_nodes[:, depth] = torch.where(hit, nxt, accepted_nodes[:, depth])
        tokens[:, depth] = torch.where(hit, kid_tokens[rows, first], tokens[:, depth])
        num_accepted += hit.long()
        cur = torch.where(hit, nxt, cur)
        alive = hit
    tokens.scatter_(1, num_accepted[:, None], best[rows, cur][:, None])
    is_bonus = tree.children[rows, cur, 0] < 0
    return Verdict(num_accepted, tokens, is_bonus, accepted_nodes=accepted_nodes)


@register_acceptance_rule
class GreedyAcceptance(AcceptanceRule):
    """Keep drafts while they equal the target's argmax; then take the target's argmax.

    Lossless for greedy decoding: the output equals greedy (argmax) decoding of the target token for
    token, for chains and trees. With a sampling configuration it would return argmax tokens instead
    of samples, so the loop refuses that combination (``requires_greedy``).
    """

    name = "greedy"
    lossless = True
    bound = "identical to greedy decoding of the target"
    requires_greedy = True

    def verify(self, draft: Draft, target_probs: torch.Tensor, generator: torch.Generator | None) -> Verdict:
        if draft.tree is not None:
            return _greedy_tree_walk(draft, lambda p: p.argmax(-1), target_probs)
        best = target_probs.argmax(-1)  # [B, k + 1]
        k = draft.tokens.shape[1]
        match = (draft.tokens == best[:, :k]).long()
        num_accepted = match.cumprod(1).sum(1)
        tokens = torch.cat([draft.tokens, torch.full_like(draft.tokens[:, :1], -1)], dim=1)
        positions = torch.arange(k + 1, device=tokens.device)[None]
        tokens = torch.where(positions < num_accepted[:, None], tokens, -1)
        tokens.scatter_(1, num_accepted[:, None], best.gather(1, num_accepted[:, None]))
        return Verdict(num_accepted, tokens, is_bonus=num_accepted == k)


@register_acceptance_rule
class ExactAcceptance(AcceptanceRule):
    """Speculative sampling: accept draft x with probability min(1, p(x)/q(x)); at the first rejection
    sample from the residual norm(max(0, p - q)); after a fully accepted chain sample a bonus from p
    (Leviathan et al. 2023, Alg. 1; Chen et al. 2023, Alg. 2). Trees: recursive rejection sampling
    over siblings (SpecInfer, Miao et al. 2024; Jeon et al. 2024), where each node's ``draft_probs``
    is the proposal it was drawn from given its earlier siblings (one-hot when absent).

    Lossless: the output tokens are distributed exactly as sampling from the target (tested by an
    empirical-distribution test whose tolerance shrinks with the number of samples). With greedy
    target probabilities (one-hot) it reduces to :class:`GreedyAcceptance`.
    """

    name = "exact"
    lossless = True
    bound = "identical in distribution to sampling from the target"

    def verify(self, draft: Draft, target_probs: torch.Tensor, generator: torch.Generator | None) -> Verdict:
        batch, num_nodes = draft.tokens.shape
        device = target_probs.device
        uniform_accept = torch.rand(batch, num_nodes, generator=generator, device=device)
        uniform_sample = torch.rand(batch, generator=generator, device=device)
        if draft.tree is None:
            num_accepted, tokens = chain_rejection_sample(
                draft.tokens, draft.draft_probs, target_probs, uniform_accept, uniform_sample
            )
            return Verdict(num_accepted, tokens, is_bonus=num_accepted == num_nodes)
        tree = draft.tree
        num_accepted, accepted_nodes, tokens = tree_rejection_sample(
            draft.tokens, tree.children, draft.draft_probs, target_probs, uniform_accept, uniform_sample,
            tree.max_depth,
        )
        rows = torch.arange(batch, device=device)
        last = torch.cat([torch.zeros_like(accepted_nodes[:, :1]), accepted_nodes], 1).gather(1, num_accepted[:, None])[:, 0]
        return Verdict(num_accepted, tokens, is_bonus=tree.children[rows, last, 0] < 0, accepted_nodes=accepted_nodes)


from . import relaxed  # noqa: E402,F401  (registers the relaxed rules "lantern", "gsd"; after the names they import)
