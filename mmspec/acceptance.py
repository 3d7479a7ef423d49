"""Acceptance rules: given a draft and the target's distributions, decide what to keep.

Rules are the analogue of diffusers schedulers: swappable without touching the loop. Each states
``lossless`` and, if lossy, the ``bound`` it guarantees. This module holds the base class, the
registry (``ACCEPTANCE_RULES``, filled by :func:`register_acceptance_rule`) and the two lossless
token rules; :mod:`mmspec.rules` imports every rule module and looks rules up by name
(:func:`mmspec.rules.get_acceptance_rule`).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch

from .kernels.rejection import chain_rejection_sample, tree_rejection_sample
from .sampling import SamplingConfig
from .types import Categorical, CommitMode, Distribution, Draft, Verdict

ACCEPTANCE_RULES: dict[str, type[AcceptanceRule]] = {}


def register_acceptance_rule(cls: type[AcceptanceRule]) -> type[AcceptanceRule]:
    """Class decorator: make a rule available by its ``name``."""
    ACCEPTANCE_RULES[cls.name] = cls
    return cls


class AcceptanceRule(ABC):
    """Decides, element by element, which drafts to keep and what replaces the others.

    ``verify(draft, target, generator)`` reads ``target``, a typed view of the target's
    distributions (the class in ``distribution``: :class:`~mmspec.types.Categorical` for token
    rules, :class:`~mmspec.types.DiagonalGaussian` for continuous ones; None for routers, which
    decide before the target runs). Prefix rules over tokens get ``target.probs`` ``[B, k + 1, V]``
    for a chain (index i = the target's distribution after the committed prefix and the first i
    drafts) or ``[B, N, V]`` for a tree (index n = distribution after node n, node 0 = root).
    ``commit`` says which loop can run the rule (:class:`~mmspec.types.CommitMode`).
    """

    name: ClassVar[str]
    lossless: ClassVar[bool]
    #: What the rule guarantees about the output distribution, in words.
    bound: ClassVar[str]
    #: True if the rule is only meaningful for greedy decoding (temperature 0 / top_k 1).
    requires_greedy: ClassVar[bool] = False
    #: How the verdict is committed: prefix (causal loop), elementwise (masked loop), block (block loop).
    commit: ClassVar[CommitMode] = CommitMode.PREFIX
    #: The view of the target the rule reads (None: a router, deciding before the target runs).
    distribution: ClassVar[type | None] = Categorical
    #: Constructor arguments :meth:`from_resources` fills from the pipeline's models (not options a
    #: pipeline's caller passes by name).
    resource_arguments: ClassVar[tuple[str, ...]] = ()
    #: Options :meth:`from_resources` takes beyond the constructor's (e.g. where a table is cached).
    resource_options: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def option_names(cls, from_resources: bool = False) -> tuple[str, ...] | None:
        """The options the rule takes by name: its constructor's keyword arguments or, with
        ``from_resources``, those :meth:`from_resources` takes (less :attr:`resource_arguments`, plus
        :attr:`resource_options`). None when the constructor takes ``**kwargs`` (any name may be one)."""
        if cls.__init__ is object.__init__:  # no constructor of its own: no options (object's *args are not)
            names: list[str] = []
        else:
            params = list(inspect.signature(cls.__init__).parameters.values())[1:]
            if any(p.kind is p.VAR_KEYWORD for p in params):
                return None
            names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if from_resources:
            names = [n for n in names if n not in cls.resource_arguments] + list(cls.resource_options)
        return tuple(names)

    def __repr__(self) -> str:
        """The rule and its settings (scalars only; tables are left out), stable across runs: it goes into
        records such as a batch job's ``job.json``."""
        settings = ", ".join(
            f"{k}={v!r}"
            for k, v in vars(self).items()
            if not k.startswith("_") and isinstance(v, (int, float, str, bool, tuple, type(None)))
        )
        return f"{type(self).__name__}({settings})"

    @classmethod
    def from_resources(cls, resources: dict, **options) -> AcceptanceRule:
        """Build the rule for a pipeline: ``resources`` holds what the pipeline offers rules that
        need its models (``"codebook"`` ``[V, C]``, ``"token_embeddings"`` ``[V, H]``, ``"grid"``
        ``(h, w)``, ``"cache_dir"``: see ``SpeculativePipeline.rule_resources``); most rules only
        take their ``options``."""
        return cls(**options)

    @abstractmethod
    def verify(self, draft: Draft, target: Distribution | None, generator: torch.Generator | None) -> Verdict:
        """Return the :class:`~mmspec.types.Verdict` for ``draft`` under the ``target`` view.

        Every prefix rule accepts empty drafts (a ``[B, 0]`` chain, a root-only tree): the verdict is
        then the bonus token alone (vLLM's ``test_empty_sequence``)."""

    def target_sampling(self, sampling: SamplingConfig) -> SamplingConfig:
        """The configuration the loop turns the target's logits into the rule's view with, in a run
        with ``sampling``. Default: the run's own. A rule that decides greedily from soft
        probabilities (official LANTERN's greedy mode: the softmax at temperature 1) returns another;
        drafts and the plain baseline keep ``sampling``."""
        return sampling

    def _probs(self, target: Distribution | None) -> torch.Tensor:
        """``target.probs`` of a categorical view, or a TypeError that says what to pass."""
        if not isinstance(target, Categorical):
            raise TypeError(
                f"acceptance rule {self.name!r} reads a Categorical view of the target "
                f"(mmspec.types.Categorical(probs [B, T, V])), got {type(target).__name__}"
            )
        return target.probs


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

    def verify(self, draft: Draft, target: Distribution | None, generator: torch.Generator | None) -> Verdict:
        target_probs = self._probs(target)
        if draft.tree is not None:
            return _greedy_tree_walk(draft, lambda p: p.argmax(-1), target_probs)
        best = target_probs.argmax(-1)  # [B, k + 1]
        k = draft.tokens.shape[1]
        match = (draft.tokens == best[:, :k]).long()
        num_accepted = match.cumprod(1).sum(1)
        # new_full, not full_like(tokens[:, :1]): a k = 0 draft has no column to copy the shape from
        tokens = torch.cat([draft.tokens, draft.tokens.new_full((draft.tokens.shape[0], 1), -1)], dim=1)
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

    def verify(self, draft: Draft, target: Distribution | None, generator: torch.Generator | None) -> Verdict:
        target_probs = self._probs(target)
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
            draft.tokens,
            tree.children,
            draft.draft_probs,
            target_probs,
            uniform_accept,
            uniform_sample,
            tree.max_depth,
        )
        rows = torch.arange(batch, device=device)
        root = accepted_nodes.new_zeros(batch, 1)  # not zeros_like(accepted_nodes[:, :1]): a root-only tree has D = 0
        last = torch.cat([root, accepted_nodes], 1).gather(1, num_accepted[:, None])[:, 0]
        return Verdict(num_accepted, tokens, is_bonus=tree.children[rows, last, 0] < 0, accepted_nodes=accepted_nodes)
