"""LlamaGen's GPT (Sun et al. 2024, "Autoregressive Model Beats Diffusion", arXiv 2406.06525) as an
mmspec target.

Module and parameter names are the official ones (``autoregressive/models/gpt.py`` of
FoundationVision/LlamaGen), so an official state dict loads strictly (see :mod:`.official`). The
decoder blocks, RMSNorm and the rotary helper come from :mod:`mmspec.modeling`; this file adds the
condition embedders, LlamaGen's 2-D RoPE table and the target contract (``new_cache`` /
``prefill`` / ``forward``) over :class:`~mmspec.cache.StaticKVCache`.

Sequence layout (official): ``cls_token_num`` condition positions (1 class embedding for c2i, the
projected caption for t2i) followed by the ``grid_size**2`` image tokens in raster order. Under
classifier-free guidance the cache holds ``[cond ; uncond]`` rows, like official ``generate()``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from mmspec.cache import StaticKVCache
from mmspec.modeling import RMSNorm, TransformerBlock, find_multiple
from mmspec.types import PrefillOutput, TargetOutput

from ..component_mixin import ComponentMixin

# The official CaptionEmbedder is always built with its default ``token_num=120`` (the T5 feature
# length), whatever ``cls_token_num`` is: ``uncond_embedding`` is ``[120, caption_dim]``.
CAPTION_TOKEN_NUM = 120


def llamagen_freqs_2d(
    grid_size: int,
    head_dim: int,
    base: float = 10000.0,
    cls_token_num: int = 1,
    positions: torch.Tensor | None = None,  # [...] int64 absolute sequence positions
) -> torch.Tensor:
    """LlamaGen's 2-D rotary table (official ``precompute_freqs_cis_2d``), float32 cos/sin.

    Args:
        grid_size: side of the token grid (``block_size = grid_size**2``).
        head_dim: per-head width (divisible by 4: half the rotation pairs encode the row, half the
            column).
        base: RoPE base (``rope_base``).
        cls_token_num: number of condition positions; their rows are all ZERO (cos = sin = 0),
            which zeroes q and k there, exactly like the official table (not an identity rotation).
        positions: absolute positions to look up (the first image token is at ``cls_token_num``).
            Positions past the last image token are clamped to the last row: the speculative loop
            may run a few positions beyond the image and discards those outputs. ``None`` returns
            the whole table.

    Returns:
        ``[cls_token_num + grid_size**2, head_dim/2, 2]`` when ``positions`` is None, else
        ``[..., head_dim/2, 2]``; ``[..., 0]`` = cos, ``[..., 1]`` = sin.

    The angles of image token ``(r, c)`` are ``[r f_0 .. r f_{hd/4-1}, c f_0 .. c f_{hd/4-1}]`` with
    ``f_i = base ** (-2i / (hd/2))``, all in float32 as the official code does. The table is never a
    module buffer, so it stays float32 when the model is cast to bf16/fp16, matching the official code
    where ``freqs_cis`` is a plain float32 attribute; :func:`llamagen_freqs_table` caches it per device.
    """
    if head_dim % 4:
        raise ValueError(f"LlamaGen's 2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    num_positions = cls_token_num + grid_size * grid_size
    if positions is None:
        positions = torch.arange(num_positions)
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, device=positions.device)[: half // 2].float() / half))
    image_index = (positions.clamp(max=num_positions - 1) - cls_token_num).clamp(min=0)
    row = (image_index // grid_size).float()[..., None] * inv_freq  # [..., hd/4]
    col = (image_index % grid_size).float()[..., None] * inv_freq  # [..., hd/4]
    angles = torch.cat([row, col], dim=-1)  # [..., hd/2]
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    is_condition = (positions < cls_token_num)[..., None, None]
    return table.masked_fill(is_condition, 0.0)


@functools.lru_cache(maxsize=32)
def llamagen_freqs_table(
    grid_size: int, head_dim: int, base: float, cls_token_num: int, device: torch.device
) -> torch.Tensor:
    """:func:`llamagen_freqs_2d`'s whole table ``[cls_token_num + grid_size**2, head_dim/2, 2]``, built
    once per model size and device (the official code precomputes it too): a forward indexes its
    rows (one op) instead of rebuilding them (~15 ops). Built outside inference mode: the first call may
    come from the (inference-mode) decoding loop, and the cached table is shared with training code."""
    num_positions = cls_token_num + grid_size * grid_size
    with torch.inference_mode(False):
        return llamagen_freqs_2d(grid_size, head_dim, base, cls_token_num, torch.arange(num_positions, device=device))


@dataclass
class LlamaGenCondition:
    """What conditions one LlamaGen generation batch (exactly one of labels / captions).

    Args:
        class_labels: ``[B]`` int64 ImageNet-style class ids (c2i models). The null class
            ``num_classes`` is the unconditional CFG branch and may also be passed explicitly.
        caption_embs: ``[B, L, caption_dim]`` text features (t2i models; official: FLAN-T5-XL,
            ``L = 120``), LEFT padded: valid rows at the end.
        caption_mask: ``[B, L]`` 1/True for valid caption rows (None = all valid).
    """

    class_labels: torch.Tensor | None = None
    caption_embs: torch.Tensor | None = None
    caption_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.class_labels is None) == (self.caption_embs is None):
            raise ValueError("LlamaGenCondition needs exactly one of class_labels (c2i) or caption_embs (t2i)")
        if self.caption_mask is not None and self.caption_embs is None:
            raise ValueError("caption_mask was given without caption_embs")
        if self.caption_mask is not None and self.caption_mask.shape != self.caption_embs.shape[:2]:
            raise ValueError(
                f"caption_mask {tuple(self.caption_mask.shape)} must be [B, L] of caption_embs "
                f"{tuple(self.caption_embs.shape)}"
            )

    @property
    def batch_size(self) -> int:
        return (self.class_labels if self.class_labels is not None else self.caption_embs).shape[0]


class LabelEmbedder(nn.Module):
    """Class-label table (official ``LabelEmbedder``): ``num_classes + 1`` rows when CFG training was
    on (``class_dropout_prob > 0``); the extra row ``num_classes`` is the null class."""

    def __init__(self, num_classes: int, dim: int, with_null_class: bool) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(with_null_class), dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:  # [B] -> [B, 1, dim]
        return self.embedding_table(labels)[:, None]


class CaptionMLP(nn.Module):
    """Official caption projection ``fc2(gelu_tanh(fc1(x)))``, no biases."""

    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, dim, bias=False)
        self.fc2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., caption_dim] -> [..., dim]
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """Official ``CaptionEmbedder``: ``cap_proj`` plus the unconditional caption, a (never trained)
    buffer ``uncond_embedding [120, caption_dim]`` initialised ``randn / sqrt(caption_dim)``."""

    def __init__(self, caption_dim: int, dim: int) -> None:
        super().__init__()
        self.cap_proj = CaptionMLP(caption_dim, dim)
        self.register_buffer("uncond_embedding", torch.randn(CAPTION_TOKEN_NUM, caption_dim) / caption_dim**0.5)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:  # [B, L, caption_dim] -> [B, L, dim]
        return self.cap_proj(caption)


class LlamaGenGPT(ComponentMixin, ModelMixin, ConfigMixin):
    """LlamaGen class- or text-conditional GPT implementing mmspec's target contract.

    Config fields are the official ``ModelArgs`` fields that shape the network or its inference
    (dropouts, ``max_batch_size`` and ``max_seq_len`` do not; the loader ignores them). Defaults
    are the official ``ModelArgs`` defaults.

    Args:
        dim, n_layer, n_head: width, depth, attention heads.
        n_kv_head: key/value heads (grouped-query attention); None = ``n_head``.
        multiple_of, ffn_dim_multiplier: SwiGLU hidden size
            ``find_multiple(int(2*4*dim/3) [* ffn_dim_multiplier], multiple_of)``.
        rope_base: 2-D RoPE base. norm_eps: RMSNorm epsilon.
        initializer_range: std of the official init (Linear/Embedding N(0, std), ``output`` zero).
        num_classes: class count (c2i). caption_dim: text-feature width (t2i).
        class_dropout_prob: > 0 means the c2i table has the null-class row (CFG).
        model_type: ``"c2i"`` or ``"t2i"``.
        vocab_size: image-token vocabulary (= VQ codebook size).
        cls_token_num: condition positions (1 for c2i; 120 for the official t2i models).
        block_size: image tokens per image, ``grid_size**2``.
    """

    @register_to_config
    def __init__(
        self,
        dim: int = 4096,
        n_layer: int = 32,
        n_head: int = 32,
        n_kv_head: int | None = None,
        multiple_of: int = 256,
        ffn_dim_multiplier: float | None = None,
        rope_base: float = 10000.0,
        norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        num_classes: int = 1000,
        caption_dim: int = 2048,
        class_dropout_prob: float = 0.1,
        model_type: str = "c2i",
        vocab_size: int = 16384,
        cls_token_num: int = 1,
        block_size: int = 256,
    ) -> None:
        super().__init__()
        grid = math.isqrt(block_size)
        if grid * grid != block_size:
            raise ValueError(f"block_size must be a square grid (grid_size**2), got {block_size}")
        if model_type not in ("c2i", "t2i"):
            raise ValueError(f"model_type must be 'c2i' or 't2i', got {model_type!r}")
        if model_type == "c2i" and cls_token_num != 1:
            # The label embedder yields one position; official c2i models always use 1.
            raise ValueError(f"a c2i model has exactly 1 condition position, got cls_token_num={cls_token_num}")
        if model_type == "t2i" and not 1 <= cls_token_num <= CAPTION_TOKEN_NUM:
            raise ValueError(f"a t2i model needs 1 <= cls_token_num <= {CAPTION_TOKEN_NUM}, got {cls_token_num}")
        if dim % n_head or (dim // n_head) % 4:
            raise ValueError(f"dim ({dim}) / n_head ({n_head}) must be an integer divisible by 4 (2-D RoPE)")
        hidden_dim = int(2 * 4 * dim / 3)
        if ffn_dim_multiplier is not None:
            hidden_dim = int(ffn_dim_multiplier * hidden_dim)
        hidden_dim = find_multiple(hidden_dim, multiple_of)

        if model_type == "c2i":
            self.cls_embedding = LabelEmbedder(num_classes, dim, with_null_class=class_dropout_prob > 0)
        else:
            self.cls_embedding = CaptionEmbedder(caption_dim, dim)
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(
            TransformerBlock(dim, n_head, n_kv_head, hidden_dim, norm_eps) for _ in range(n_layer)
        )
        self.norm = RMSNorm(dim, norm_eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        self._init_weights(initializer_range)

    def _init_weights(self, std: float) -> None:
        """Official init: N(0, std) for Linear and Embedding weights, zero LM head."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
        nn.init.zeros_(self.output.weight)

    # ------------------------------------------------------------------ sizes
    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.config.block_size)

    @property
    def cls_token_num(self) -> int:
        return self.config.cls_token_num

    @property
    def head_dim(self) -> int:
        return self.config.dim // self.config.n_head

    @property
    def max_positions(self) -> int:
        """Length of a full sequence: condition positions + image tokens."""
        return self.config.cls_token_num + self.config.block_size

    # ------------------------------------------------------------------ target contract
    def new_cache(self, batch_size: int, max_seq_len: int, cfg: bool = False) -> StaticKVCache:
        """Allocate a cache on this model's device/dtype; ``cfg`` keeps ``[cond ; uncond]`` row pairs."""
        return self._cache(self.config.n_layer, batch_size, max_seq_len, groups=2 if cfg else 1)

    def prefill(self, condition: LlamaGenCondition, cache: StaticKVCache) -> PrefillOutput:
        """Write and commit the ``cls_token_num`` condition positions (0..T-1) of a fresh cache.

        With ``cache.groups == 2`` the unconditional twin is written too: the null class
        ``num_classes`` (c2i) or ``uncond_embedding`` (t2i) with the SAME caption mask as its
        conditional row (official ``generate()``). Padded caption positions are blocked in the
        cache, so no later query sees them.

        Returns:
            :class:`PrefillOutput` whose ``output`` holds the last condition position (``T = 1``;
            its logits predict the first image token) and ``hidden_states_all`` ``[B, T_cond, H]``
            of the conditional half.
        """
        if condition.batch_size != cache.batch_size:
            raise ValueError(f"condition has {condition.batch_size} rows but the cache {cache.batch_size}")
        h, blocked = self._embed_condition(condition, cache.groups)  # [G*B, T, dim], [B, T] | None
        num_cond = h.shape[1]
        if num_cond > cache.max_seq_len:
            raise ValueError(
                f"the cache holds {cache.max_seq_len} positions, fewer than the {num_cond} condition positions"
            )
        if blocked is not None:
            cache.block_keys(blocked)
        positions = torch.arange(num_cond, device=h.device).expand(cache.batch_size, num_cond)
        logits, hidden = self._decode(h, positions, cache, None)
        cache.commit(torch.full((cache.batch_size,), num_cond, dtype=torch.long, device=cache.device))
        out = self._split(logits[:, -1:], hidden[:, -1:], cache.groups)
        return PrefillOutput(out, hidden_states_all=hidden[: cache.batch_size])

    def forward(
        self,
        tokens: torch.Tensor,  # [B, T] image-token ids
        positions: torch.Tensor,  # [B, T] absolute positions (first image token = cls_token_num)
        cache: StaticKVCache,
        attn_mask: torch.Tensor | None = None,  # [G*B, 1, T, S] bool from cache.attention_mask
    ) -> TargetOutput:
        """Run ``tokens`` at the next ``T`` cache slots of every row (and of both CFG halves).

        The cache is written, never committed (the caller commits what it accepts). ``attn_mask``
        None means causal over the new tokens; a tree mask from ``cache.attention_mask(slots,
        tree_mask)`` is used as given. Positions past the last image token reuse the last RoPE row
        (see :func:`llamagen_freqs_2d`).
        """
        if tokens.shape[0] != cache.batch_size:
            raise ValueError(f"tokens have {tokens.shape[0]} rows but the cache {cache.batch_size}")
        h = self.tok_embeddings(tokens).repeat(cache.groups, 1, 1)
        logits, hidden = self._decode(h, positions, cache, attn_mask)
        return self._split(logits, hidden, cache.groups)

    def teacher_forced_logits(self, condition: LlamaGenCondition, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, N, V]`` where ``[:, j]`` predicts ``tokens[:, j]`` (``tokens``: ``[B, N]``).

        The official training forward ``model(cond_idx, tokens[:, :-1], targets=tokens)`` without
        dropout: one causal pass over the condition and ``tokens[:, :-1]``, logits sliced from the
        last condition position (LlamaGen, arXiv 2406.06525). Differentiable: each layer
        writes its own single-layer cache, because a write into a buffer shared by all layers
        would invalidate the keys/values autograd saved for the earlier layers.
        """
        batch, num_tokens = tokens.shape
        num_cond = self.config.cls_token_num
        seq_len = num_cond + num_tokens - 1
        device = self.output.weight.device
        caches = [self._cache(1, batch, seq_len, groups=1) for _ in self.layers]
        h_cond, blocked = self._embed_condition(condition, groups=1)  # [B, T, dim], [B, T] | None
        if blocked is not None:
            caches[0].block_keys(blocked)  # the attention mask is built from caches[0]
        h = torch.cat([h_cond, self.tok_embeddings(tokens[:, :-1].to(device))], dim=1)
        positions = torch.arange(seq_len, device=device).expand(batch, seq_len)
        logits, _ = self._decode(h, positions, caches[0], None, layer_caches=caches)
        return logits[:, num_cond - 1 :]

    # ------------------------------------------------------------------ internals
    def _cache(self, num_layers: int, batch_size: int, max_seq_len: int, groups: int) -> StaticKVCache:
        weight = self.output.weight
        return StaticKVCache(
            num_layers,
            batch_size,
            self.config.n_kv_head or self.config.n_head,
            max_seq_len,
            self.head_dim,
            dtype=weight.dtype,
            device=weight.device,
            groups=groups,
        )

    def _embed_condition(self, condition: LlamaGenCondition, groups: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Condition embeddings ``[G*B, T, dim]`` and the blocked (padded) positions ``[B, T]`` or None."""
        if groups not in (1, 2):
            raise ValueError(f"LlamaGen caches have 1 group (no CFG) or 2 ([cond ; uncond]), got {groups}")
        device = self.output.weight.device
        num_cond = self.config.cls_token_num
        if self.config.model_type == "c2i":
            if condition.class_labels is None:
                raise ValueError("this is a class-conditional (c2i) LlamaGen model: pass class_labels")
            labels = condition.class_labels.to(device=device, dtype=torch.long)
            if groups == 2:
                if self.config.class_dropout_prob <= 0:
                    raise ValueError(
                        "CFG needs the null class, but this c2i model has class_dropout_prob 0 (no null row)"
                    )
                labels = torch.cat([labels, torch.full_like(labels, self.config.num_classes)])
            return self.cls_embedding(labels), None

        if condition.caption_embs is None:
            raise ValueError("this is a text-conditional (t2i) LlamaGen model: pass caption_embs")
        caption = condition.caption_embs.to(device=device, dtype=self.output.weight.dtype)
        if caption.shape[1] < num_cond or caption.shape[2] != self.config.caption_dim:
            raise ValueError(
                f"caption_embs must be [B, L >= {num_cond}, {self.config.caption_dim}], got {tuple(caption.shape)}"
            )
        mask = condition.caption_mask
        mask = (
            torch.ones(caption.shape[:2], dtype=torch.bool, device=device) if mask is None else mask.to(device).bool()
        )
        # Official slicing keeps the first cls_token_num rows; padded rows enter as zeros.
        caption, mask = caption[:, :num_cond], mask[:, :num_cond]
        h = self.cls_embedding(caption * mask[..., None].to(caption.dtype))
        if groups == 2:
            uncond = self.cls_embedding(self.cls_embedding.uncond_embedding[:num_cond].to(caption.dtype))
            h = torch.cat([h, uncond.expand_as(h)])
        return h, ~mask

    def _decode(
        self,
        h: torch.Tensor,  # [G*B, T, dim] input embeddings
        positions: torch.Tensor,  # [B, T]
        cache: StaticKVCache,
        attn_mask: torch.Tensor | None,  # [G*B, 1, T, S] or None = causal
        layer_caches: list[StaticKVCache] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer stack; returns float32 logits and the final-normed hidden states.

        Slots and the default mask come from ``cache``; layer ``i`` reads/writes layer ``i`` of
        ``cache``, or layer 0 of ``layer_caches[i]`` when given (see :meth:`teacher_forced_logits`).
        """
        slots = cache.slots(h.shape[1])
        if attn_mask is None:
            attn_mask = cache.attention_mask(slots)
        # SDPA turns a bool mask into an additive one (0 / -inf) in every layer; once per forward
        # here gives the very same values.
        attn_mask = torch.where(attn_mask, 0.0, float("-inf")).to(h.dtype)
        rope = (self.grid_size, self.head_dim, self.config.rope_base, self.config.cls_token_num)
        if torch.compiler.is_compiling():
            # In a compiled graph the rows fuse into one kernel (and a traced table lookup trips inductor).
            freqs = llamagen_freqs_2d(*rope, positions)
        else:
            # Eager: index the cached table; positions past the last image token reuse its row.
            table = llamagen_freqs_table(*rope, positions.device)
            freqs = table[positions.clamp(max=table.shape[0] - 1)]
        freqs = freqs.repeat(cache.groups, 1, 1, 1)
        for i, layer in enumerate(self.layers):
            if layer_caches is None:
                h = layer(h, freqs, cache, i, slots, attn_mask)
            else:
                h = layer(h, freqs, layer_caches[i], 0, slots, attn_mask)
        h = self.norm(h)
        return self.output(h).float(), h

    @staticmethod
    def _split(logits: torch.Tensor, hidden: torch.Tensor, groups: int) -> TargetOutput:
        """Split ``[G*B, ...]`` rows into the conditional and (under CFG) unconditional halves."""
        if groups == 1:
            return TargetOutput(logits=logits, hidden_states=hidden)
        cond_logits, uncond_logits = logits.chunk(2)
        cond_hidden, uncond_hidden = hidden.chunk(2)
        return TargetOutput(cond_logits, cond_hidden, uncond_logits, uncond_hidden)
