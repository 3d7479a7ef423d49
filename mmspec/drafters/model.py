"""Small-model drafting (Leviathan et al. 2023; Chen et al. 2023): a cheaper model with the same
vocabulary proposes tokens autoregressively from its own KV cache.

With ``num_alternatives > 1`` the proposal is a tree: the drafted chain plus, at every depth,
``num_alternatives - 1`` sibling leaves taken from the same draft distribution (greedy: the next
most likely tokens; sampling: draws without replacement, each with its conditional proposal
distribution, as recursive rejection sampling needs — Jeon et al. 2024). The target verifies the
whole tree in one forward; the drafting cost is that of the chain.
"""

from __future__ import annotations

import torch

from ..sampling import logits_to_probs, race_noise, sample_from_probs
from ..tree import DraftTree
from ..types import Draft, DraftContext, PrefillOutput, Target, Verdict


class ModelDrafter:
    """Draft with ``model``, any object satisfying the target contract (e.g. a small
    :class:`~mmspec.modeling.DecoderLM` or a smaller LlamaGen GPT) that takes the same prompt.

    Args:
        model: the draft model. Its vocabulary must equal the target's.
        num_alternatives: candidates per depth (1 = a chain).

    The draft cache mirrors the target's: it holds every committed token but the last. Drafting
    ``k`` tokens runs ``k + 1`` single-token forwards (the last one only caches ``d_k`` so that a
    fully accepted chain needs no catch-up); commit is a rollback to the target's length. ``k = 0``
    (an adaptive window that found drafting does not pay) runs nothing: the draft cache falls behind
    and the next draft first catches up on the tokens committed meanwhile in one forward, so a
    skipped step costs what a plain target step costs.
    """

    def __init__(self, model: Target, num_alternatives: int = 1) -> None:
        if num_alternatives < 1:
            raise ValueError(f"num_alternatives must be >= 1, got {num_alternatives}")
        self.model = model
        self.vocab_size = model.vocab_size
        self.num_alternatives = num_alternatives
        self.cache = None
        self._behind = 0  # skipped steps since the last draft: each committed at most one token per row
        self._trees: dict[tuple, DraftTree] = {}  # static tree shapes, built once per (B, k, device)

    def prefill(self, ctx: DraftContext, prompt, prefill: PrefillOutput) -> None:
        batch = ctx.last_tokens.shape[0]
        # Deliberate sync, once per call. A finished row keeps drafting while others go on: its length
        # reaches max_new_tokens + k - 1 past the prompt and its drafts k + 1 slots more; the history
        # holds max_new_tokens + k + 1 slots after its prefix, so twice its width covers both.
        capacity = int(ctx.positions.max()) + 2 * ctx.history.shape[1] + 2
        self.cache = self.model.new_cache(batch, capacity, cfg=ctx.sampling.uses_cfg)
        self.model.prefill(prompt, self.cache)
        self.cache.rollback(ctx.positions)
        self._behind = 0

    def commit(self, ctx: DraftContext, verdict: Verdict) -> None:
        if not self._behind:  # after a skipped step the cache stays behind the target (nothing was written)
            self.cache.rollback(ctx.positions)

    def _catch_up(self, ctx: DraftContext) -> None:
        """Cache the committed tokens a skipped step left out (all but the last), in one forward of
        ``_behind`` tokens per row; rows that committed fewer (finished) cache only theirs."""
        lag = ctx.positions - self.cache.lengths  # [B], <= _behind
        # The token at cache slot p is history[p + offset]: the last one (history_lengths - 1) goes to ctx.positions.
        offset = ctx.history_lengths - 1 - ctx.positions  # [B]
        slots = self.cache.slots(self._behind)  # [B, n]
        index = (slots + offset[:, None]).clamp(0, ctx.history.shape[1] - 1)
        # Slots past a finished row's lag read pad ids (clamped to 0): written, never committed.
        self.model.forward(ctx.history.gather(1, index).clamp(min=0), slots, self.cache, None)
        self.cache.commit(lag)
        self._behind = 0

    def verify_width(self, num_draft_tokens: int) -> int:
        return 1 + num_draft_tokens * self.num_alternatives  # root + (chain node + siblings) per depth

    def draft(self, ctx: DraftContext, num_draft_tokens: int, generator: torch.Generator | None) -> Draft:
        if num_draft_tokens == 0:  # an adaptive window's "no draft this step"
            self._behind += 1
            return Draft.empty(ctx.last_tokens)
        if self._behind:
            self._catch_up(ctx)
        token = ctx.last_tokens[:, None]  # [B, 1]
        tokens, probs = [], []
        seen = ctx.seen  # [B, V] or None: the repetition penalty sees the drafts as the target will
        # Built once per draft, not per forward: the k + 1 positions (= slots), split into per-forward
        # views in one op, and the one-token commit. Tensors keep their one-position axis: a slice,
        # unsqueeze or squeeze per forward is an op per draft position.
        positions = self.cache.slots(num_draft_tokens + 1).split(1, dim=1)  # k + 1 x [B, 1]
        one = torch.ones_like(ctx.last_tokens)
        for step in range(num_draft_tokens + 1):
            out = self.model.forward(token, positions[step], self.cache, None)  # logits [B, 1, V]
            self.cache.commit(one)
            if step == num_draft_tokens:
                break  # this forward only cached d_k
            q = logits_to_probs(out.logits, ctx.sampling, out.uncond_logits, None if seen is None else seen[:, None])
            if step == 0:
                # The sampling noise of every draft at once (nothing else draws between them): 2 ops per
                # draft instead of 2 per token, the same numbers on the CPU.
                noise = race_noise(num_draft_tokens, q.shape, generator, q.device)  # k x [B, 1, V] | None
            token = sample_from_probs(q, generator, noise[step])  # [B, 1]
            if seen is not None:
                seen = seen.scatter(1, token, True)
            tokens.append(token)
            probs.append(q)
        self.cache.rollback(ctx.positions)  # drafts are not committed until verified
        tokens_t, probs_t = torch.cat(tokens, 1), torch.cat(probs, 1)  # [B, k], [B, k, V]
        one_hot = ctx.sampling.greedy
        if self.num_alternatives == 1:
            return Draft(tokens=tokens_t, draft_probs=None if one_hot else probs_t)
        return self._with_alternatives(ctx, tokens_t, probs_t, one_hot, generator)

    def _with_alternatives(self, ctx, chain, probs, one_hot, generator) -> Draft:
        """Tree = chain + (num_alternatives - 1) sibling leaves per depth, chain child first."""
        batch, k = chain.shape
        width = self.num_alternatives
        cand = [chain]
        cand_probs = [probs]
        remaining = probs.clone()
        for _ in range(width - 1):
            remaining = remaining.scatter(-1, cand[-1][..., None], 0.0)
            if one_hot:
                nxt = remaining.argmax(-1)
            else:
                nxt = sample_from_probs(remaining, generator)
            cand.append(nxt)
            # The conditional proposal of this sibling: q without its earlier siblings, renormalised.
            cand_probs.append(remaining / remaining.sum(-1, keepdim=True).clamp(min=1e-20))
        # Node layout: root, then for each depth: chain node, alternatives.
        parents = [-1]
        for depth in range(k):
            parent = 0 if depth == 0 else 1 + (depth - 1) * width
            parents += [parent] * width
        key = (batch, k, chain.device)
        if key not in self._trees:
            self._trees[key] = DraftTree.from_parents(torch.tensor(parents).expand(batch, -1).contiguous()).to(
                chain.device
            )
        tree = self._trees[key]
        nodes = torch.stack(cand, 2).reshape(batch, k * width)  # [B, k * width]
        tokens = torch.cat([ctx.last_tokens[:, None], nodes], 1)
        draft_probs = None
        if not one_hot:
            node_probs = torch.stack(cand_probs, 2).reshape(batch, k * width, -1)
            draft_probs = torch.cat([torch.zeros_like(node_probs[:, :1]), node_probs], 1)
        return Draft(tokens=tokens, draft_probs=draft_probs, tree=tree)
