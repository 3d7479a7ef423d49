"""EAGLE feature-level drafting (Li et al. 2024, "EAGLE", arXiv 2401.15077) with EAGLE-2 dynamic
draft trees (Li et al. 2024, arXiv 2406.16858).

The target's last hidden state before its LM head (its *feature*) is far more predictable than the
next token. An EAGLE head is one decoder block that autoregresses on features: at sequence
position ``t`` it reads ``fc([embed(x_{t+1}) ; f_t])`` -- the feature of position ``t`` paired with
the token sampled FROM it (EAGLE, Sec. 3: the token sequence shifted by one step removes the
sampling uncertainty) -- and predicts ``f_{t+1}``; the target's own frozen LM head turns that
into the distribution of ``x_{t+2}``. Token embedding and LM head are the target's (shared, never copied or saved).

Cache layout. The head keeps a one-layer :class:`~mmspec.cache.StaticKVCache` whose slot ``t``
holds the pair ``(f_t, x_{t+1})`` at RoPE position ``t``. Between steps it holds every pair whose
feature came from the target and whose token is committed, except the newest ``num_new``: those
arrive with the verify step's features (``ctx.hidden_states``) and are run first in ``draft`` (the
*catch-up*), whose last output predicts the first draft. Draft-time pairs carry the head's own
predicted features and are never committed, so commit is a rollback. Condition positions with no
following token (LlamaGen's class/caption prefix) hold no pair: their slots are blocked.
Under CFG the cache has ``groups = 2``; the head runs on the conditional and the unconditional
features alike and both halves combine through :func:`~mmspec.sampling.logits_to_probs`, exactly
as the target's do.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..cache import StaticKVCache
from ..checkpoint_io import read_json, read_safetensors
from ..compile import mark_static
from ..kernels.rows import gather_rows
from ..modeling import TransformerBlock, find_multiple, rope_frequencies, rope_table
from ..sampling import SamplingConfig, logits_to_probs, race_noise, sample_from_probs
from ..tree import DraftTree
from ..types import Draft, DraftContext, PrefillOutput, Verdict
from ..weights_check import load_checked

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class EagleConfig:
    """Size of an :class:`EagleHead` and the target it belongs to.

    Args:
        hidden_size: the target's feature width ``H`` (also the head's width).
        n_head: attention heads of the head's decoder block.
        vocab_size: the target's vocabulary ``V``.
        target_name: names the target the head was trained for (checked on loading).
        multiple_of: SwiGLU width rounding (LlamaGen's rule, as :class:`~mmspec.modeling.DecoderConfig`).
        norm_eps: RMSNorm epsilon.
        rope_base: RoPE base of the head's attention.
    """

    hidden_size: int
    n_head: int
    vocab_size: int
    target_name: str
    multiple_of: int = 64
    norm_eps: float = 1e-5
    rope_base: float = 10000.0

    @property
    def ffn_dim(self) -> int:
        return find_multiple(int(2 * 4 * self.hidden_size / 3), self.multiple_of)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head


@dataclass(frozen=True)
class TargetModules:
    """The target's token embedding and LM head, shared with the head (not registered as its
    submodules: they are neither trained nor saved with it).

    ``embed`` maps token ids ``[...]`` to ``[..., H]`` and says its size as ``num_embeddings`` /
    ``embedding_dim`` (an ``nn.Embedding``, or e.g. Janus's image-token embedding + aligner);
    ``lm_head`` maps features ``[..., H]`` to logits ``[..., V]`` with ``in_features`` /
    ``out_features`` (an ``nn.Linear``, or e.g. Janus's two-layer image head)."""

    embed: nn.Module
    lm_head: nn.Module


def frozen_call(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``module(inputs)`` with the module's parameters detached: a head's gradients reach its own
    inputs, never the weights it shares with the target (the target is the teacher, frozen)."""
    if not torch.is_grad_enabled():
        return module(inputs)
    return torch.func.functional_call(module, {n: p.detach() for n, p in module.named_parameters()}, (inputs,))


def _module_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class EagleHead(nn.Module):
    """EAGLE's autoregression head: ``fc`` over ``[token embedding ; feature]`` then one decoder
    block predicting the next feature (EAGLE, Sec. 3, drafting phase).

    Args:
        config: sizes and the target's name.
        embed: the target's token embedding ``V -> H`` (frozen, shared; see :class:`TargetModules`).
        lm_head: the target's LM head ``H -> V`` applied to its post-norm features (frozen, shared).
            Both or neither: a head built without them (its weights loaded on their own, as a pipeline
            component is) drafts only once :meth:`share_target` gives it the target's.
    """

    def __init__(self, config: EagleConfig, embed: nn.Module | None = None, lm_head: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.target_modules: TargetModules | None = None
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size)
        self.block = TransformerBlock(config.hidden_size, config.n_head, None, config.ffn_dim, config.norm_eps)
        if (embed is None) != (lm_head is None):
            raise ValueError("give the EAGLE head both the target's embedding and its LM head, or neither")
        if embed is not None:
            self.share_target(embed, lm_head)

    def share_target(self, embed: nn.Module, lm_head: nn.Module) -> EagleHead:
        """Share the target's token embedding and LM head (checked against the head's sizes). Returns the head."""
        expected = (self.config.vocab_size, self.config.hidden_size)
        sizes = (("embedding", embedding_size(embed)), ("LM head", (lm_head.out_features, lm_head.in_features)))
        for name, size in sizes:
            if size != expected:
                raise ValueError(
                    f"the target's {name} maps {list(size)} (vocabulary, hidden), but the EAGLE head "
                    f"for {self.config.target_name!r} needs [vocab_size, hidden_size] = {list(expected)}"
                )
        self.target_modules = TargetModules(embed, lm_head)
        return self

    def _shared(self) -> TargetModules:
        if self.target_modules is None:
            raise RuntimeError("this EAGLE head has no target yet: call share_target(embed, lm_head) first")
        return self.target_modules

    def forward(
        self,
        tokens: torch.Tensor,  # [B, T] x_{t+1}: the token that follows each feature
        features: torch.Tensor,  # [G*B, T, H] f_t (target features, or the head's own predictions)
        positions: torch.Tensor,  # [B, T] sequence positions t (RoPE)
        cache: StaticKVCache,  # the head's one-layer cache (groups G)
        slots: torch.Tensor,  # [B, T] cache slots to write
        attn_mask: torch.Tensor,  # [G*B, 1, T, S] bool
    ) -> torch.Tensor:
        """Predicted features ``f_{t+1}`` ``[G*B, T, H]`` (EAGLE eq.: ``f_{t+1} = Block(fc([e_{t+1}; f_t]))``)."""
        groups = features.shape[0] // tokens.shape[0]
        dtype = self.fc.weight.dtype
        embed = frozen_call(self._shared().embed, tokens).to(dtype).repeat(groups, 1, 1)
        x = self.fc(torch.cat([embed, features.to(dtype)], dim=-1))
        if torch.compiler.is_compiling():  # a traced table lookup trips inductor; the rows fuse anyway
            freqs = rope_frequencies(positions, self.config.head_dim, self.config.rope_base)
        else:  # positions are cache slots, < max_seq_len: rows of the cached table
            table = rope_table(cache.max_seq_len, self.config.head_dim, self.config.rope_base, positions.device)
            freqs = table[positions]
        freqs = freqs.repeat(groups, 1, 1, 1)
        return self.block(x, freqs, cache, 0, slots, attn_mask)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The target's LM head on (predicted) features ``[..., H]`` -> float32 logits ``[..., V]``."""
        lm_head = self._shared().lm_head
        return frozen_call(lm_head, features.to(_module_dtype(lm_head))).float()

    def new_cache(self, batch_size: int, max_seq_len: int, groups: int = 1) -> StaticKVCache:
        """An empty one-layer cache for ``batch_size`` rows (``groups = 2``: CFG pairs)."""
        weight = self.fc.weight
        return StaticKVCache(
            1,
            batch_size,
            self.config.n_head,
            max_seq_len,
            self.config.head_dim,
            dtype=weight.dtype,
            device=weight.device,
            groups=groups,
        )

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path) -> None:
        """Write the head's own weights (``model.safetensors``) and ``config.json``; the shared
        target modules are not saved."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, directory / WEIGHTS_NAME)
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> EagleHead:
        """Load a head saved by :meth:`save_pretrained`, not yet sharing a target's embedding and LM head
        (:meth:`share_target`). A folder without a head, another model's config or mismatched weights
        raise ValueError naming the folder and the keys."""
        directory = Path(directory)
        head = cls(read_eagle_config(directory))
        weights = read_safetensors(directory / WEIGHTS_NAME)
        load_checked(head, weights, "the EAGLE head", str(directory))
        return head

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, embed: nn.Module, lm_head: nn.Module, target_name: str
    ) -> EagleHead:
        """Load a head saved by :meth:`save_pretrained` for the target ``target_name`` whose
        ``embed`` / ``lm_head`` it will share. A head trained for another target raises ValueError."""
        check_target(read_eagle_config(Path(directory)), embed, target_name, str(directory))
        head = cls.load(directory)
        head.share_target(embed, lm_head)
        return head.to(next(embed.parameters()).device)


def embedding_size(embed: nn.Module) -> tuple[int, int]:
    """``(vocabulary, hidden)`` of a shared token embedding (:class:`TargetModules`)."""
    return embed.num_embeddings, embed.embedding_dim


def check_target(config: EagleConfig, embed: nn.Module, target_name: str, source: str) -> None:
    """Raise ValueError unless the head described by ``config`` (loaded from ``source``) was trained for
    the target ``target_name`` whose token embedding is ``embed``."""
    vocab, hidden = embedding_size(embed)
    if (config.target_name, config.vocab_size, config.hidden_size) != (target_name, vocab, hidden):
        raise ValueError(
            f"the EAGLE head in {source} was trained for target {config.target_name!r} "
            f"(vocab {config.vocab_size}, hidden {config.hidden_size}), not for target {target_name!r} "
            f"(vocab {vocab}, hidden {hidden}); train a head for {target_name!r} (mmspec train-drafter)"
        )


def read_eagle_config(directory: Path) -> EagleConfig:
    """The :class:`EagleConfig` saved in ``directory``; ``ValueError`` saying what is wrong when the
    folder holds no EAGLE head (missing files, another model's config)."""
    from dataclasses import MISSING, fields

    if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise ValueError(
            f"{directory} holds no EAGLE head: it needs {CONFIG_NAME} and {WEIGHTS_NAME} as written by "
            "EagleHead.save_pretrained (`mmspec train-drafter`)"
        )
    raw = read_json(directory / CONFIG_NAME)
    names = {f.name for f in fields(EagleConfig)}
    required = {f.name for f in fields(EagleConfig) if f.default is MISSING}
    unexpected, missing = sorted(set(raw) - names), sorted(required - set(raw))
    if unexpected or missing:
        raise ValueError(
            f"{directory / CONFIG_NAME} is not an EAGLE head config (missing keys: {missing or 'none'}; "
            f"unexpected keys: {unexpected[:8] or 'none'}): point at a folder written by `mmspec train-drafter`"
        )
    return EagleConfig(**raw)


def target_fingerprint(lm_head: nn.Module) -> str:
    """A name for the exact target a head is trained for: a hash of its LM head's weights (every
    tensor of the module the head shares, in ``state_dict`` order: an ``nn.Linear`` without bias
    hashes its weight alone), so a head can never be attached to a different target by mistake."""
    import hashlib

    digest = hashlib.sha256()
    for tensor in lm_head.state_dict().values():
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:16]


@dataclass(frozen=True)
class TreeConfig:
    """EAGLE-2 dynamic tree budget (EAGLE-2, Sec. 4).

    Args:
        depth: levels of drafts (the deepest possible accepted path).
        top_k: nodes expanded per level, and children per expanded node.
        total_nodes: draft nodes kept after reranking (the verify window is ``1 + total_nodes``).
    """

    depth: int
    top_k: int
    total_nodes: int

    def __post_init__(self) -> None:
        most = self.top_k + (self.depth - 1) * self.top_k**2
        if self.depth < 1 or self.top_k < 1 or not 1 <= self.total_nodes <= most:
            raise ValueError(
                f"need depth >= 1, top_k >= 1 and 1 <= total_nodes <= top_k + (depth - 1) * top_k**2 = {most}, "
                f"got depth={self.depth}, top_k={self.top_k}, total_nodes={self.total_nodes}"
            )

    @property
    def window(self) -> int:
        """Head cache slots the expanded nodes occupy past the committed length."""
        return (self.depth - 1) * self.top_k


class EagleDrafter:
    """Draft with an :class:`EagleHead` from the features the loop provides.

    Args:
        head: the trained head (shares the target's embedding and LM head).
        tree: None drafts a chain of ``num_draft_tokens``; a :class:`TreeConfig` drafts EAGLE-2
            dynamic trees (then ``num_draft_tokens`` must equal ``tree.depth``).
        step: ``head.forward`` compiled (:func:`mmspec.compile.compile_step`, kept by the caller so it
            compiles once, not per drafter); None runs the head eagerly. Its cache is then marked
            static (CUDA graphs write it in place).

    Proposals: a chain samples each token from ``q`` (``draft_probs = q``; greedy configs take the
    argmax and pass None). Tree children are the top-k of ``q`` -- deterministic, hence one-hot
    proposals (``draft_probs`` None), which keeps exact acceptance lossless.
    """

    def __init__(self, head: EagleHead, tree: TreeConfig | None = None, step: Callable | None = None) -> None:
        self.head = head
        self.tree = tree
        self.step = head if step is None else step
        self.vocab_size = head.config.vocab_size
        self.cache: StaticKVCache | None = None

    # ------------------------------------------------------------------ Drafter contract
    def prefill(self, ctx: DraftContext, prompt, prefill: PrefillOutput) -> None:
        """Run the prompt's pairs ``(f_t, x_{t+1})`` into a fresh head cache (all but the newest,
        which ``draft`` runs as its catch-up)."""
        features = prefill.hidden_states_all  # [B, P, H]
        if features is None:
            raise ValueError("EagleDrafter needs the target's prompt features: PrefillOutput.hidden_states_all is None")
        batch, width, _ = features.shape
        groups = 2 if ctx.sampling.uses_cfg else 1
        tree_slots = 0 if self.tree is None else self.tree.window + self.tree.depth
        # deliberate sync, once per generation: size the cache for every position the run can reach
        capacity = int(ctx.positions.max()) + 2 * ctx.history.shape[1] + tree_slots + 2
        self.cache = self.head.new_cache(batch, capacity, groups)
        if self.step is not self.head:
            mark_static(self.cache)
        t = torch.arange(width, device=features.device)[None]  # [1, P]
        first_token_pos = ctx.positions + 1 - ctx.history_lengths  # [B] sequence position of history[0]
        # Positions whose next input is not a token (a condition prefix) hold no pair.
        self.cache.block_keys(t < first_token_pos[:, None] - 1)
        start = ctx.positions - ctx.num_new  # [B] pairs before this are the prompt's
        if bool((start > (first_token_pos - 1).clamp(min=0)).any()):  # deliberate sync, once per generation
            if groups == 2:
                raise ValueError(
                    "EAGLE under classifier-free guidance needs the unconditional features of the prompt's "
                    "token positions, which PrefillOutput does not carry (it has only hidden_states_all of "
                    "the conditional half); condition-prefix targets such as LlamaGen are supported"
                )
            tokens = self._history_tokens(ctx, t + 1 - first_token_pos[:, None])
            slots = self.cache.slots(width)
            self.step(tokens, features, slots, self.cache, slots, self.cache.attention_mask(slots))
        self.cache.commit(start)

    def commit(self, ctx: DraftContext, verdict: Verdict) -> None:
        """Keep the pairs whose features came from the target; the newest ``num_new`` are run by
        the next ``draft`` together with their features."""
        self.cache.rollback(ctx.positions - ctx.num_new)

    def verify_width(self, num_draft_tokens: int) -> int:
        return num_draft_tokens + 1 if self.tree is None else 1 + self.tree.total_nodes

    def draft(self, ctx: DraftContext, num_draft_tokens: int, generator: torch.Generator | None) -> Draft:
        """Catch up on the last step's features, then draft a chain or an EAGLE-2 tree."""
        self._seen = ctx.seen  # [B, V] or None: a repetition penalty applies to drafts too
        feature, logits = self._catch_up(ctx)  # [G*B, H], [G*B, V]: the root's predicted feature
        if self.tree is None:
            if num_draft_tokens == 0:  # an adaptive window's "no draft this step": only the catch-up ran
                return Draft.empty(ctx.last_tokens)
            return self._draft_chain(ctx, feature, logits, num_draft_tokens, generator)
        if num_draft_tokens != self.tree.depth:
            raise ValueError(
                f"EAGLE tree drafting proposes paths of depth {self.tree.depth}: pass "
                f"num_draft_tokens={self.tree.depth} (the loop sizes its buffers and statistics by it), "
                f"got {num_draft_tokens}"
            )
        return self._draft_tree(ctx, feature, logits)

    # ------------------------------------------------------------------ steps
    def _catch_up(self, ctx: DraftContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the pairs ``(f_t, x_{t+1})`` of the tokens committed by the last step, commit them and
        return the last one's predicted feature ``[G*B, H]`` and its logits ``[G*B, V]``."""
        features = self._both_halves(ctx.hidden_states, ctx.uncond_hidden_states)  # [G*B, n, H]
        num = features.shape[1]
        # x_{t+1} of the newest num_new features are the last num_new history tokens.
        tokens = self._history_tokens(
            ctx, (ctx.history_lengths - ctx.num_new)[:, None] + torch.arange(num, device=features.device)
        )
        slots = self.cache.slots(num)  # [B, n] = sequence positions t
        out = self.step(tokens, features, slots, self.cache, slots, self.cache.attention_mask(slots))
        self.cache.commit(ctx.num_new)
        last = (ctx.num_new - 1).clamp(min=0).repeat(self.cache.groups)  # rows that committed nothing: unused
        feature = out[torch.arange(out.shape[0], device=out.device), last]
        return feature, self.head.logits(feature)

    def _draft_chain(self, ctx, feature, logits, num_draft_tokens, generator) -> Draft:
        """``k`` autoregressive head steps on its own predicted features (EAGLE, Sec. 3, drafting phase)."""
        # The k - 1 head queries sit at slots lengths + i (also their positions) and see the committed
        # keys and the chain's earlier pairs: causal masks, built once per chain and sliced per position.
        chain_slots = self.cache.slots(num_draft_tokens - 1)  # [B, k - 1]
        masks = self.cache.attention_mask(chain_slots)  # [G*B, 1, k - 1, S]
        # Every tensor keeps its one-position axis and the per-position views come from one split
        # each: a slice, unsqueeze or squeeze per draft position is an op per position (~5 x k).
        slots = chain_slots.split(1, dim=1)  # k - 1 x [B, 1]
        mask = masks.split(1, dim=2)  # k - 1 x [G*B, 1, 1, S]
        feature, logits = feature[:, None], logits[:, None]  # [G*B, 1, H], [G*B, 1, V]
        # The sampling noise of every position at once (nothing else draws between them): 2 ops per
        # step instead of 2 per position, the same numbers on the CPU. Greedy chains draw nothing.
        shape = (ctx.last_tokens.shape[0], 1, logits.shape[-1])
        noise = () if ctx.sampling.greedy else race_noise(num_draft_tokens, shape, generator, logits.device)
        tokens, probs = [], []
        for i in range(num_draft_tokens):
            q = self._probs(logits, ctx.sampling)  # [B, 1, V]
            token = q.argmax(-1) if ctx.sampling.greedy else sample_from_probs(q, generator, noise[i])  # [B, 1]
            tokens.append(token)
            probs.append(q)
            if i == num_draft_tokens - 1:
                break  # the last draft's pair is never needed
            feature = self.step(token, feature, slots[i], self.cache, slots[i], mask[i])  # [G*B, 1, H]
            logits = self.head.logits(feature)
        draft_probs = None if ctx.sampling.greedy else torch.cat(probs, 1)  # [B, k, V]
        return Draft(tokens=torch.cat(tokens, 1), draft_probs=draft_probs)

    def _draft_tree(self, ctx, feature, logits) -> Draft:
        """EAGLE-2 expansion phase (Sec. 4): the depth-1 candidates are the ``top_k`` tokens of the
        root's ``q``; each further level runs the head on the ``top_k`` candidates of the deepest
        level with the highest path score ``sum log q`` (value ~ acceptance probability), all in one
        forward over their ancestors, and gives each ``top_k`` children. ``feature`` ``[G*B, H]`` and
        ``logits`` ``[G*B, V]`` are the root's (from the catch-up)."""
        top_k, window = self.tree.top_k, self.tree.window
        base = self.cache.lengths  # [B] position of the depth-1 candidates' pairs
        log_q, tokens = self._rank_probs(logits, ctx.sampling).log().topk(top_k, -1)  # [B, K]
        scores, parents = log_q, torch.full_like(tokens, -1)  # path scores; parent candidate ids (-1 = root)
        parent_out = feature[:, None]  # [G*B, R, H] predicted features of this level's parents
        parent_anc = torch.zeros(len(base), 1, window, dtype=torch.bool, device=base.device)  # [B, R, W]
        levels = [(tokens, scores, parents)]
        first_id = 0  # candidate id of this level's first candidate
        for level in range(1, self.tree.depth):
            pick = scores.topk(top_k, -1).indices  # [B, K] the frontier
            row = pick // top_k  # [B, K] its parents' rows: every parent has top_k children in a row
            slots = base[:, None] + (level - 1) * top_k + torch.arange(top_k, device=base.device)  # [B, K]
            anc = gather_rows(parent_anc, row)
            # [B, K, W] ancestors and self (a comparison, not F.one_hot: that reads the ids back to the host)
            anc = anc | ((slots - base[:, None])[..., None] == torch.arange(window, device=base.device))
            inputs = gather_rows(parent_out, row.repeat(self.cache.groups, 1))
            positions = (base + level - 1)[:, None].expand(-1, top_k)
            out = self.step(tokens.gather(1, pick), inputs, positions, self.cache, slots, _window_mask(self.cache, anc))
            log_q, children = self._rank_probs(self.head.logits(out), ctx.sampling).log().topk(top_k, -1)  # [B, K, K]
            parents = (first_id + pick).repeat_interleave(top_k, 1)  # [B, K*K]
            first_id += tokens.shape[1]
            tokens = children.flatten(1)
            scores = (scores.gather(1, pick)[..., None] + log_q).flatten(1)
            parent_out, parent_anc = out, anc
            levels.append((tokens, scores, parents))
        return self._rerank(ctx, *(torch.cat(parts, 1) for parts in zip(*levels)))

    def _rerank(self, ctx, tokens, scores, parents) -> Draft:
        """EAGLE-2 reranking phase (Sec. 4): keep the ``total_nodes`` candidates of highest path score.
        ``tokens``/``scores``/``parents`` ``[B, C]`` list candidates level by level, siblings by
        descending ``q``. Scores never increase along a path, and the stable sort puts a parent before
        an equal-score child, so every kept node's ancestors are kept; sorting the kept ids restores
        topological order with the most likely sibling first (tested first)."""
        keep = scores.sort(dim=1, descending=True, stable=True).indices[:, : self.tree.total_nodes]
        keep = keep.sort(dim=1).values  # [B, M]
        node_of = torch.zeros_like(parents).scatter(
            1, keep, torch.arange(1, keep.shape[1] + 1, device=keep.device).expand_as(keep)
        )  # candidate id -> node index (node 0 is the root)
        node_parents = torch.where(parents >= 0, node_of.gather(1, parents.clamp(min=0)), 0).gather(1, keep)
        node_parents = torch.cat([torch.full_like(node_parents[:, :1], -1), node_parents], 1)  # [B, N]
        nodes = torch.cat([ctx.last_tokens[:, None], tokens.gather(1, keep)], 1)  # [B, N]
        tree = tree_from_parents(node_parents, self.tree.depth, self.tree.top_k)
        return Draft(tokens=nodes, draft_probs=None, tree=tree)  # top-k children: one-hot proposals

    # ------------------------------------------------------------------ helpers
    def _both_halves(self, cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        """``[G*B, ...]`` rows in the cache's ``[cond ; uncond]`` layout."""
        if self.cache.groups == 1:
            return cond
        if uncond is None:
            raise ValueError("EAGLE under classifier-free guidance needs the target's unconditional features")
        return torch.cat([cond, uncond])

    def _probs(self, logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
        """``[G*B, ..., V]`` head logits -> ``[B, ..., V]`` draft distribution, through the target's
        own ``logits_to_probs`` (CFG, temperature, top-k, top-p), so draft and target agree."""
        cond, uncond = (logits, None) if self.cache.groups == 1 else logits.chunk(2)
        seen = getattr(self, "_seen", None)  # [B, V] -> [B, 1.., V] to match cond
        seen = None if seen is None else seen.view(seen.shape[0], *([1] * (cond.dim() - 2)), seen.shape[-1])
        return logits_to_probs(cond, sampling, uncond, seen)

    def _rank_probs(self, logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
        """The distribution that scores tree candidates: ``q`` itself, except for greedy configs,
        whose ``q`` is one-hot and cannot rank alternatives (then: temperature 1, no truncation)."""
        if sampling.greedy:
            sampling = replace(sampling, temperature=1.0, top_k=None, top_p=1.0)
        return self._probs(logits, sampling)

    @staticmethod
    def _history_tokens(ctx: DraftContext, index: torch.Tensor) -> torch.Tensor:
        """``history[b, index[b, j]]`` (``[B, T]``); out-of-range entries (unused pairs) read a valid id."""
        tokens = ctx.history.gather(1, index.clamp(0, ctx.history.shape[1] - 1))
        return tokens.clamp(min=0)  # padding ids (e.g. -1) of unused pairs must still embed


def _window_mask(cache: StaticKVCache, window: torch.Tensor) -> torch.Tensor:
    """Attention mask ``[G*B, 1, T, S]`` for draft queries: every committed, unblocked key of the
    row plus the draft-window keys ``window [B, T, W]`` allows (``window[b, t, w]``: query ``t`` sees
    slot ``lengths[b] + w``, i.e. its ancestors and itself)."""
    batch, num_queries, width = window.shape
    key = torch.arange(cache.max_seq_len, device=cache.device)[None]  # [1, S]
    committed = (key < cache.lengths[:, None]) & ~cache.blocked  # [B, S]
    offset = key - cache.lengths[:, None]  # [B, S] window index of each slot
    in_window = (offset >= 0) & (offset < width)
    index = offset.clamp(0, max(width - 1, 0))[:, None].expand(batch, num_queries, -1)
    allowed = window.gather(2, index) & in_window[:, None]
    return (committed[:, None] | allowed).repeat(cache.groups, 1, 1)[:, None]


def tree_from_parents(parents: torch.Tensor, max_depth: int, max_children: int) -> DraftTree:
    """A :class:`~mmspec.tree.DraftTree` from parent pointers ``[B, N]`` (topological order,
    siblings in testing order) without host syncs: ``max_depth`` and ``max_children`` are known
    bounds (EAGLE-2: the tree depth and ``top_k``), so no tensor has to be inspected."""
    batch, num_nodes = parents.shape
    device = parents.device
    up = parents.clamp(min=0)  # the root points at itself
    eye = torch.eye(num_nodes, dtype=torch.bool, device=device)
    ancestor = eye.expand(batch, -1, -1)
    for _ in range(max_depth):  # each pass adds one more generation of ancestors
        ancestor = eye | ancestor.gather(1, up[..., None].expand(-1, -1, num_nodes))
    depth = ancestor.sum(-1) - 1
    # A node's rank among its siblings = how many earlier nodes share its parent.
    nodes = torch.arange(num_nodes, device=device)
    is_child = (up[..., None] == nodes) & (nodes > 0)[None, :, None]  # one-hot of the parent, sync-free
    rank = is_child.long().cumsum(1).gather(2, up[..., None])[..., 0] - 1  # [B, N]
    flat = torch.where(parents >= 0, up * max_children + rank, num_nodes * max_children)  # root: spare slot
    children = torch.full((batch, num_nodes * max_children + 1), -1, dtype=torch.long, device=device)
    children.scatter_(1, flat, torch.arange(num_nodes, device=device).expand(batch, -1))
    children = children[:, :-1].view(batch, num_nodes, max_children)
    return DraftTree(parents, depth, ancestor, children, max_depth, max_children)
