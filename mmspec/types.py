"""The contracts between mmspec's four roles: target, drafter, acceptance rule, loop.

Names follow the papers' p (target) and q (draft): ``target_probs`` / ``draft_probs``;
``num_draft_tokens`` is the papers' gamma / k. A verdict's tokens are *accepted* (drafts kept),
*recovered* (resampled at the first rejection) or *bonus* (sampled from the target after a
fully accepted draft).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from .cache import StaticKVCache
from .sampling import SamplingConfig
from .tree import DraftTree


@dataclass
class TargetOutput:
    """What a target (or a model-based drafter) returns for ``T`` new tokens of ``B`` rows.

    ``logits``: ``[B, T, V]`` float32 (conditional half under CFG).
    ``hidden_states``: ``[B, T, H]`` last hidden states before the LM head (EAGLE features), or None.
    ``uncond_logits`` / ``uncond_hidden_states``: the unconditional CFG half, same shapes, or None.
    """

    logits: torch.Tensor
    hidden_states: torch.Tensor | None = None
    uncond_logits: torch.Tensor | None = None
    uncond_hidden_states: torch.Tensor | None = None


@dataclass
class TokenPrompt:
    """A right-padded batch of token prompts: ``tokens [B, P]``, ``lengths [B]`` (each >= 1)."""

    tokens: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def from_lists(cls, prompts: list[list[int]], pad_id: int = 0, device: torch.device | str = "cpu") -> "TokenPrompt":
        """Build from ragged Python lists (right padding with ``pad_id``)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt must contain at least one token")
        width = max(len(p) for p in prompts)
        tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.as_tensor(p, dtype=torch.long)
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        return cls(tokens.to(device), lengths.to(device))


@dataclass
class PrefillOutput:
    """A target's prefill result: the output at the last real prompt position of each row.

    ``output``: :class:`TargetOutput` with ``T = 1``; ``hidden_states_all``: ``[B, P, H]`` features of
    every prompt position (for drafters that need the prompt's features, e.g. EAGLE), or None.
    """

    output: TargetOutput
    hidden_states_all: torch.Tensor | None = None


@dataclass
class DraftContext:
    """Everything a drafter may look at when proposing (the hardest drafters need all of it).

    ``history``: ``[B, S_h]`` prompt + committed tokens (static buffer; valid up to ``history_lengths``).
    ``history_lengths``: ``[B]``.
    ``last_tokens``: ``[B]`` the last committed token (not yet in any KV cache).
    ``positions``: ``[B]`` sequence position of ``last_tokens`` (= the target cache's committed length).
    ``hidden_states``: ``[B, n, H]`` target features of the tokens committed by the last step (row b
        valid for its first ``num_new[b]`` entries; the last valid one precedes ``last_tokens``), or None.
    ``uncond_hidden_states``: the same for the unconditional CFG half, or None.
    ``target_probs``: ``[B, T, V]`` the target distributions of the last verify step (index i = after
        its i-th input; chains: ``[last, d_1 .. d_k]``, trees: node order), None after prefill.
        Jacobi drafters (SJD) refresh their window from it.
    ``num_new``: ``[B]`` how many tokens the last step committed per row.
    ``condition``: whatever conditions the generation (class labels, image features, CFG flag, ...).
    ``sampling``: the sampling configuration; drafters must use the same ``logits_to_probs``.
    """

    history: torch.Tensor
    history_lengths: torch.Tensor
    last_tokens: torch.Tensor
    positions: torch.Tensor
    sampling: SamplingConfig
    hidden_states: torch.Tensor | None = None
    uncond_hidden_states: torch.Tensor | None = None
    target_probs: torch.Tensor | None = None
    num_new: torch.Tensor | None = None
    condition: Any = None


@dataclass
class Draft:
    """A proposal. Chain: ``tokens [B, k]``, ``tree`` None. Tree: ``tokens [B, N]`` with node 0 = the
    last committed token (root, never verified) and ``tree`` describing the structure.

    ``draft_probs``: ``[B, k, V]`` (chain) / ``[B, N, V]`` (tree: the proposal distribution each node
    was drawn from, given its earlier siblings), or None when proposals are deterministic.
    """

    tokens: torch.Tensor
    draft_probs: torch.Tensor | None = None
    tree: DraftTree | None = None

    @property
    def num_draft_tokens(self) -> int:
        return self.tokens.shape[1] if self.tree is None else self.tree.max_depth


@dataclass
class Verdict:
    """An acceptance rule's decision for every row.

    ``num_accepted``: ``[B]`` drafts kept. ``tokens``: ``[B, D + 1]`` the accepted drafts then one
    recovered-or-bonus token, padded with -1 (``D`` = ``num_draft_tokens``). ``accepted_nodes``:
    ``[B, D]`` tree node indices of the accepted path (-1 padded), None for chains.
    ``is_bonus``: ``[B]`` bool, whether the final token is a bonus (all drafts on the path accepted
    and the path ended at a leaf) rather than a recovered one.
    ``moved_mass``: ``[B, D + 1]`` total variation between the distribution actually sampled and the
    target's, per committed position, for lossy rules (None for lossless rules).
    """

    num_accepted: torch.Tensor
    tokens: torch.Tensor
    is_bonus: torch.Tensor
    accepted_nodes: torch.Tensor | None = None
    moved_mass: torch.Tensor | None = None


@runtime_checkable
class Target(Protocol):
    """A model wrapped for speculative decoding. Masks and caches are arguments, never attributes."""

    vocab_size: int

    def new_cache(self, batch_size: int, max_seq_len: int, cfg: bool = False) -> StaticKVCache:
        """An empty cache; ``cfg=True`` keeps a ``[cond ; uncond]`` row pair per condition."""

    def prefill(self, prompt: Any, cache: StaticKVCache) -> PrefillOutput:
        """Write and commit the whole prompt/condition; return the last position's output."""

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache, attn_mask: torch.Tensor | None
    ) -> TargetOutput:
        """Run ``tokens [B, T]`` at sequence ``positions [B, T]`` written after the committed cache."""


@runtime_checkable
class Drafter(Protocol):
    """Proposes draft tokens; owns (and rolls back) its own state."""

    vocab_size: int

    def prefill(self, ctx: DraftContext, prompt: Any, prefill: PrefillOutput) -> None: ...

    def draft(self, ctx: DraftContext, num_draft_tokens: int, generator: torch.Generator | None) -> Draft: ...

    def verify_width(self, num_draft_tokens: int) -> int:
        """The most tokens one verify forward takes for drafts of ``num_draft_tokens`` (the last
        committed token + every draft node: ``k + 1`` for a chain, ``1 + nodes`` for a tree); the
        cache's headroom is sized by it (:func:`~mmspec.loop.required_cache_len`)."""
        ...

    def commit(self, ctx: DraftContext, verdict: Verdict) -> None:
        """Roll own state to the committed sequence described by ``ctx`` (already updated)."""
