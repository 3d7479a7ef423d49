"""Vision-aware EAGLE drafters for VLM targets: one EAGLE head, pluggable *visual paths*.

A VLM prompt is dominated by image tokens. The drafter is an EAGLE head (Li et al. 2024, arXiv
2401.15077: one decoder block over ``fc([token embedding ; target feature])``, the target's
embedding and LM head shared and frozen) with EAGLE-2 dynamic trees or chains
(:class:`~mmspec.drafters.eagle.EagleDrafter`); what differs between methods is what the head's own
KV cache holds for the image span of the prompt. The target is never changed, so decoding stays
lossless whatever the visual path.

Entries of the drafter cache (its *layout*). Text keeps EAGLE's pairing: an entry at sequence
position ``t`` reads ``(f_t, x_{t+1})`` -- the target feature of ``t`` and the embedding of the
token after it (the pair before an image therefore embeds the image placeholder token). An image
token ``i`` is an input and a state at one grid position, so image entries are position-aligned:
``(e_i, f_i)`` = the target's input embedding (the projected vision feature) and its output feature
at ``i``. A visual path maps a span's ``N`` image tokens to ``m`` entries, each placed at the
position of a *representative* image token (its sequence position orders the cache, its RoPE ids --
M-RoPE ``(t, h, w)`` for Qwen2-VL, from the target's own ``rope_positions`` -- rotate it). Text
after a span keeps its original positions, so drafts line up with the target's. Paths
(:data:`VISUAL_PATHS`):

- ``"none"``: text only, the image entries are dropped (baseline).
- ``"full"``: every image token is an entry (plain EAGLE-VLM; SpecVLM's "EagleVLM" baseline).
- ``"pool"``: average pooling over the span's token grid, window ``k x k`` when ``ratio = k^2`` and
  the grid has more than one row, else ``1 x ratio`` along rows; ``ceil(h/kh) * ceil(w/kw)``
  entries, each at its window's first (top-left) token. Grids: M-RoPE ``(h, w)`` ids (Qwen);
  LLaVA-1.5 runs of ``side^2`` tokens per image (``side`` = vision tower patches per side); any
  other span (LLaVA-NeXT's any-resolution tiles) is one row in sequence order.
- ``"prune"``: keeps the ``ceil(N / ratio)`` tokens with the largest target-feature L2 norm (a
  parameter-free saliency score; attention to the last text token would need the target's
  attention maps), at their own positions.
- ``"vispec"`` (ViSpec, Kang et al. 2025, arXiv 2509.15235): a vision adaptor -- learned queries
  cross-attending over the span's image *embeddings* -- whose ``m = min(num_queries, ceil(N /
  ratio))`` outputs replace the span; query ``j`` sits at the span token ``floor((j + 1/2) N / m)``
  (evenly spaced, raster order). A global feature per image (the mean of its adaptor outputs,
  projected) is added to the input of every later text entry (and of every generated token).
- ``"flash"`` (FLASH, Wang et al. 2025, arXiv 2505.12728): latent-aware compression -- learned
  queries over the span's target *features*, ``softmax(C F^T) F`` -- laid out as ViSpec's, and a
  semi-autoregressive head: one forward predicts the next ``tokens_per_step`` (default 2) features,
  the later ones through small lookahead MLPs on the first, so a chain of ``k`` drafts costs
  ``ceil(k / s)`` head forwards. Trees expand one level per forward (the lookahead is unused there).
- ``"specvlm"`` (SpecVLM, Huang et al. 2025, arXiv 2509.11815): an elastic compressor that chooses
  per image among pruning (the max-norm token of each pooling window), pooling, a learned strided
  depthwise convolution and a resampler (queries from the pooled windows cross-attending over the
  span). A learned gate on a global image statistic (the span's mean embedding) picks one: top-1
  at inference, straight-through Gumbel-softmax in training (as the paper). Every primitive emits
  the pooling layout, so the choice changes values, never positions.

In every attention-pooled entry (vispec, flash, resampler) the same weights pool both halves, so
an entry is an ``(embedding, feature)`` pair like the others.

Modules: the configuration and the visual paths in :mod:`~mmspec.pipelines.vlm.visual_paths`, the
layout of the drafter cache in :mod:`~mmspec.pipelines.vlm.drafter_layout`, the head and the
drafter here.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmspec.checkpoint_io import read_json, read_safetensors
from mmspec.drafters.eagle import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    EagleDrafter,
    EagleHead,
    TreeConfig,
    _window_mask,
    target_fingerprint,
)
from mmspec.modeling import RMSNorm, rope_frequencies
from mmspec.sampling import sample_from_probs
from mmspec.types import Draft, DraftContext, PrefillOutput, Verdict
from mmspec.weights_check import load_checked

from .decoder import RopeOffsetKVCache
from .drafter_layout import lay_out, prompt_sequence
from .targets import VLMPrompt, VLMTarget
from .visual_paths import PATH_DEFAULTS, VISUAL_PATHS, VLMEagleConfig

TREE_NAME = "tree.json"


# --------------------------------------------------------------------------- head and drafter


class VisualDraftCache(RopeOffsetKVCache):
    """The head's one-layer cache plus what describes its compressed sequence, per row:
    ``slot_offsets [B]`` (sequence position - cache slot of the text after the prompt),
    ``rope_offsets [B]`` (RoPE id - cache slot of that text: ``slot_offsets`` + the target's M-RoPE
    delta) and ``text_bias [B, H]`` (ViSpec's global image features, added to every later text input)."""

    def __init__(self, *args, hidden_size: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.slot_offsets = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        self.text_bias = torch.zeros(self.batch_size, hidden_size, dtype=self.k.dtype, device=self.device)

    def reset(self) -> None:
        super().reset()
        self.slot_offsets.zero_()
        self.text_bias.zero_()


class Lookahead(nn.Module):
    """FLASH's semi-autoregressive extra output: ``f_{t+1+j} ~ x + W2 silu(W1 norm(x))`` from the
    head's prediction ``x = f_{t+1}`` (``W2`` starts at zero: a copy of ``x``)."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(hidden, eps)
        self.w1 = nn.Linear(hidden, hidden)
        self.w2 = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.w2.weight)
        nn.init.zeros_(self.w2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w2(F.silu(self.w1(self.norm(x))))


class VLMEagleHead(EagleHead):
    """An :class:`~mmspec.drafters.eagle.EagleHead` with a visual path, M-RoPE and FLASH's lookahead.

    ``forward`` keeps the EAGLE drafter's call (token ids, features, slot-numbered positions) and
    maps slots to RoPE ids and text biases through the :class:`VisualDraftCache`; prompt entries
    with arbitrary input embeddings and RoPE ids go through :meth:`forward_inputs`.
    """

    def __init__(self, config: VLMEagleConfig, embed: nn.Embedding, lm_head: nn.Linear) -> None:
        super().__init__(config, embed, lm_head)
        self.visual = VISUAL_PATHS[config.visual_path](config)
        self.lookahead = nn.ModuleList(
            Lookahead(config.hidden_size, config.norm_eps) for _ in range(config.tokens_per_step - 1)
        )
        sections = config.mrope_section or (config.head_dim // 2,)
        component = torch.tensor([i % 3 for i, size in enumerate(sections) for _ in range(size)])
        self.register_buffer("rope_component", component, persistent=False)  # [D/2] t/h/w of each pair

    @classmethod
    def for_target(
        cls, target: VLMTarget, visual_path: str = "full", n_head: int | None = None, **options
    ) -> VLMEagleHead:
        """A fresh head for ``target`` (named by :func:`~mmspec.drafters.eagle.target_fingerprint`).

        ``options``: further :class:`VLMEagleConfig` fields (``ratio``, ``num_queries``,
        ``tokens_per_step``, ...) over the path's :data:`PATH_DEFAULTS`.
        """
        decoder = target.decoder
        n_head = n_head or decoder.config.n_head
        head_dim = decoder.config.dim // n_head
        sections = decoder.config.mrope_section
        if sections is not None:  # scale the target's t/h/w split to the head's width
            scaled = [round(s * (head_dim // 2) / sum(sections)) for s in sections[:-1]]
            sections = (*scaled, head_dim // 2 - sum(scaled))
        config = VLMEagleConfig(
            hidden_size=decoder.config.dim,
            n_head=n_head,
            vocab_size=decoder.vocab_size,
            target_name=target_fingerprint(decoder.output),
            norm_eps=decoder.config.norm_eps,
            visual_path=visual_path,
            image_token_id=target.image_token_id,
            mrope_section=sections,
            **{**PATH_DEFAULTS.get(visual_path, {}), **options},
        )
        return cls(config, decoder.tok_embeddings, decoder.output).to(target.device)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        tokens: torch.Tensor,  # [B, T] x_{t+1}
        features: torch.Tensor,  # [B, T, H] f_t
        positions: torch.Tensor,  # [B, T] cache slots (the EAGLE drafter's positions)
        cache: VisualDraftCache,
        slots: torch.Tensor,  # [B, T]
        attn_mask: torch.Tensor,  # [B, 1, T, S]
    ) -> torch.Tensor:
        """Predicted features ``[B, T, H]`` of text pairs after the prompt."""
        embeds = F.embedding(tokens, self.target_modules.embed.weight.detach())
        rope = positions + cache.rope_offsets[:, None]
        return self.forward_inputs(embeds, features, rope, cache, slots, attn_mask, cache.text_bias[:, None])

    def forward_inputs(
        self,
        embeds: torch.Tensor,  # [B, T, H] input embeddings (token or image)
        features: torch.Tensor,  # [B, T, H]
        rope: torch.Tensor,  # [B, T] (t = h = w) or [3, B, T] RoPE ids
        cache: VisualDraftCache,
        slots: torch.Tensor,  # [B, T]
        attn_mask: torch.Tensor,  # [B, 1, T, S]
        bias: torch.Tensor | None = None,  # [B, T or 1, H] added after fc (ViSpec's global feature)
    ) -> torch.Tensor:
        """``Block(fc([e ; f]) + bias)`` at RoPE ids ``rope`` -> predicted next features ``[B, T, H]``."""
        dtype = self.fc.weight.dtype
        x = self.fc(torch.cat([embeds.to(dtype), features.to(dtype)], dim=-1))
        if bias is not None:
            x = x + bias.to(dtype)
        return self.block(x, self._rope(rope), cache, 0, slots, attn_mask)

    def lookahead_features(self, feature: torch.Tensor) -> torch.Tensor:
        """``[B, H]`` prediction ``f_{t+1}`` -> ``[B, s, H]`` the semi-AR predictions ``f_{t+1} .. f_{t+s}``."""
        return torch.stack([feature] + [module(feature) for module in self.lookahead], 1)

    def _rope(self, rope: torch.Tensor) -> torch.Tensor:
        """Rotary table ``[B, T, D/2, 2]``: pair ``i`` turns by the id of its M-RoPE component."""
        freqs = rope_frequencies(rope, self.config.head_dim, self.config.rope_base)
        if rope.dim() == 2:
            return freqs
        pairs = torch.arange(self.rope_component.shape[0], device=rope.device)
        return freqs[self.rope_component, :, :, pairs].permute(1, 2, 0, 3)  # [3, B, T, D/2, 2] -> [B, T, D/2, 2]

    def new_cache(self, batch_size: int, max_seq_len: int, groups: int = 1) -> VisualDraftCache:
        """An empty one-layer cache (VLMs have no classifier-free guidance: ``groups`` must be 1)."""
        if groups != 1:
            raise ValueError("a VLM drafter has no unconditional branch: classifier-free guidance is not available")
        weight = self.fc.weight
        return VisualDraftCache(
            1,
            batch_size,
            self.config.n_head,
            max_seq_len,
            self.config.head_dim,
            dtype=weight.dtype,
            device=weight.device,
            hidden_size=self.config.hidden_size,
        )

    # ------------------------------------------------------------------ save / load
    @classmethod
    def from_pretrained(cls, directory: str | Path, target: VLMTarget, visual_path: str | None = None) -> VLMEagleHead:
        """Load a head saved by ``save_pretrained`` for ``target``; ``ValueError`` if it was trained
        for another target (LM-head fingerprint, image token, RoPE kind) or, when ``visual_path`` is
        given, uses another visual path."""
        directory = Path(directory)
        saved = read_json(directory / CONFIG_NAME)
        if saved.get("mrope_section") is not None:
            saved["mrope_section"] = tuple(saved["mrope_section"])
        config = VLMEagleConfig(**saved)
        checks = {  # name -> (saved, this target's)
            "target_name": (config.target_name, target_fingerprint(target.decoder.output)),
            "image_token_id": (config.image_token_id, target.image_token_id),
            "vocab_size": (config.vocab_size, target.vocab_size),
            "hidden_size": (config.hidden_size, target.decoder.config.dim),
            "M-RoPE": (config.mrope_section is not None, target.decoder.config.mrope_section is not None),
        }
        differ = [
            f"{name} {saved!r} (this target: {wanted!r})" for name, (saved, wanted) in checks.items() if saved != wanted
        ]
        if differ:
            raise ValueError(
                f"the VLM drafter in {directory} was trained for another target: {', '.join(differ)}; train one for "
                "this target (mmspec train-drafter --target-kind vlm)"
            )
        if visual_path is not None and visual_path != config.visual_path:
            raise ValueError(
                f"the VLM drafter in {directory} uses visual path {config.visual_path!r}, not {visual_path!r}"
            )
        head = cls(config, target.decoder.tok_embeddings, target.decoder.output)
        load_checked(head, read_safetensors(directory / WEIGHTS_NAME), "the VLM drafter", str(directory))
        return head.to(target.device)


class VLMEagleDrafter(EagleDrafter):
    """EAGLE / EAGLE-2 drafting for a VLM target through a :class:`VLMEagleHead`'s visual path.

    Args:
        head: the head (shares the target's embedding and LM head).
        target: the VLM it drafts for: its RoPE ids (M-RoPE) and image features lay out the prompt.
        tree: None for chains; a :class:`~mmspec.drafters.eagle.TreeConfig` for EAGLE-2 dynamic trees.

    The cache holds the prompt's layout (:func:`lay_out`), then one entry per committed text token:
    slot ``s`` of the text after the prompt is sequence position ``s + slot_offsets``, so everything
    the EAGLE drafter does by slot (catch-up, chains, trees, rollback) carries over, with RoPE ids
    and biases supplied by the cache.
    """

    def __init__(self, head: VLMEagleHead, target: VLMTarget, tree: TreeConfig | None = None) -> None:
        super().__init__(head, tree)
        self.target = target

    def prefill(self, ctx: DraftContext, prompt: VLMPrompt, prefill: PrefillOutput) -> None:
        """Lay the prompt out through the visual path and run it into a fresh cache."""
        if prefill.hidden_states_all is None:
            raise ValueError(
                "the VLM drafter needs the target's prompt features: PrefillOutput.hidden_states_all is None"
            )
        seq = prompt_sequence(self.target, prompt, prefill.hidden_states_all, self.head.fc.weight.dtype)
        layout = lay_out(self.head, seq)
        tree_slots = 0 if self.tree is None else self.tree.window + self.tree.depth
        capacity = layout.embeds.shape[1] + 2 * ctx.history.shape[1] + tree_slots + 2
        self.cache = self.head.new_cache(len(seq.num_pairs), capacity)
        slots = self.cache.slots(layout.embeds.shape[1])
        self.head.forward_inputs(
            layout.embeds,
            layout.features,
            layout.rope,
            self.cache,
            slots,
            self.cache.attention_mask(slots),
            layout.bias,
        )
        self.cache.commit(layout.lengths)
        self.cache.slot_offsets.copy_(seq.num_pairs - layout.lengths)
        self.cache.rope_offsets.copy_(self.cache.slot_offsets + seq.rope_offsets)
        self.cache.text_bias.copy_(layout.text_bias)

    def commit(self, ctx: DraftContext, verdict: Verdict) -> None:
        """Keep the target-feature pairs before the last step's ``num_new`` (in slots)."""
        self.cache.rollback(ctx.positions - ctx.num_new - self.cache.slot_offsets)

    def _draft_chain(self, ctx, feature, logits, num_draft_tokens, generator) -> Draft:
        """Chains; with a semi-autoregressive head (FLASH, ``tokens_per_step = s > 1``) each head
        forward proposes ``s`` tokens: ``f_{t+1}`` and its lookahead predictions, then the ``s``
        pairs run together to predict the next group."""
        steps = self.head.config.tokens_per_step
        if steps == 1:
            return super()._draft_chain(ctx, feature, logits, num_draft_tokens, generator)
        base = self.cache.lengths  # [B] slot of the first draft's pair
        causal = torch.ones(num_draft_tokens, num_draft_tokens, dtype=torch.bool, device=base.device).tril()
        tokens, probs = [], []
        while True:
            group = self.head.lookahead_features(feature)  # [B, s, H]
            for j in range(min(steps, num_draft_tokens - len(tokens))):
                q = self._probs(self.head.logits(group[:, j]), ctx.sampling)  # [B, V]
                tokens.append(q.argmax(-1) if ctx.sampling.greedy else sample_from_probs(q, generator))
                probs.append(q)
            if len(tokens) == num_draft_tokens:
                break
            start = len(tokens) - steps
            slots = base[:, None] + torch.arange(start, len(tokens), device=base.device)  # [B, s]
            mask = _window_mask(self.cache, causal[start : len(tokens)].expand(len(base), -1, -1))
            feature = self.head(torch.stack(tokens[start:], 1), group, slots, self.cache, slots, mask)[:, -1]
        draft_probs = None if ctx.sampling.greedy else torch.stack(probs, 1)  # [B, k, V]
        return Draft(tokens=torch.stack(tokens, 1), draft_probs=draft_probs)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path) -> None:
        """The head (weights + config naming its target and visual path) and the tree budget."""
        self.head.save_pretrained(directory)
        if self.tree is not None:
            (Path(directory) / TREE_NAME).write_text(json.dumps(asdict(self.tree)))

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, target: VLMTarget, visual_path: str | None = None, tree: TreeConfig | None = None
    ) -> VLMEagleDrafter:
        """Load a drafter for ``target`` (see :meth:`VLMEagleHead.from_pretrained` for the checks);
        ``tree`` overrides the saved tree budget."""
        head = VLMEagleHead.from_pretrained(directory, target, visual_path)
        tree_file = Path(directory) / TREE_NAME
        if tree is None and tree_file.is_file():
            tree = TreeConfig(**read_json(tree_file))
        return cls(head.eval(), target, tree)
