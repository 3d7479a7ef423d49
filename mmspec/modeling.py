"""Llama-style decoder blocks that read and write a :class:`~mmspec.cache.StaticKVCache`.

Parameter names follow LlamaGen / gpt-fast (``attention.wqkv``, ``attention.wo``,
``feed_forward.w1/w2/w3``, ``attention_norm``, ``ffn_norm``) so official LlamaGen checkpoints map
one-to-one onto them. Rotary tables are passed in per token (``freqs [B, T, D/2, 2]``, cos/sin),
so the same block serves 1-D RoPE (text), LlamaGen's 2-D RoPE over the token grid and its zeroed
condition positions. ``DecoderLM`` is a complete causal LM built from these blocks; it implements
the target contract (``forward(tokens, positions, cache, attn_mask) -> TargetOutput``) and serves as
a target or a small-model drafter.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cache import StaticKVCache
from .types import PrefillOutput, TargetOutput, TokenPrompt


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of ``k`` that is ``>= n`` (LlamaGen's FFN sizing rule)."""
    return n if n % k == 0 else n + k - n % k


def rope_frequencies(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """1-D rotary table ``[..., head_dim/2, 2]`` (cos, sin) for integer ``positions`` ``[...]``.

    Computed in float32 like LlamaGen's ``precompute_freqs_cis`` (Su et al. 2021, RoFormer eq. 34).
    """
    inv_freq = 1.0 / (
        base ** (torch.arange(0, head_dim, 2, device=positions.device)[: head_dim // 2].float() / head_dim)
    )
    angles = positions.float()[..., None] * inv_freq
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


@functools.lru_cache(maxsize=32)
def rope_table(length: int, head_dim: int, base: float, device: torch.device) -> torch.Tensor:
    """:func:`rope_frequencies` of positions ``0 .. length - 1`` (``[length, head_dim/2, 2]``), computed
    once per size and device: a forward indexes it (one op) instead of rebuilding its rows (~10 ops).
    Built outside inference mode: the first call may come from the (inference-mode) decoding loop, and
    the cached table is shared with training code."""
    with torch.inference_mode(False):
        return rope_frequencies(torch.arange(length, device=device), head_dim, base)


def apply_rotary_emb(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs ``(x[2m], x[2m+1])`` (interleaved layout, as LlamaGen / Meta Llama).

    Args:
        x: ``[B, T, H, D]`` queries or keys.
        freqs: ``[B, T, D/2, 2]`` cos/sin per token (zeros are allowed and zero the vector).
    """
    # As complex numbers: (x0 + i x1)(cos + i sin) = (x0 cos - x1 sin) + i (x1 cos + x0 sin), the
    # same products and sums as LlamaGen's real-valued stack (bit-identical on the CPU,
    # tests/core/test_modeling.py) in one kernel instead of ~12 ops.
    xs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # [B, T, H, D/2]
    rotation = torch.view_as_complex(freqs[:, :, None])  # [B, T, 1, D/2]
    return torch.view_as_real(xs * rotation).flatten(3).type_as(x)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            # torch's rms_norm is x * rsqrt(mean(x^2) + eps) * weight, the expression below, with less
            # Python and no dtype round trips (bit-identical in float32, tests/core/test_modeling.py).
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Half precision: normalise in float32, round to x's dtype, then scale (LlamaGen's order).
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    """Multi-head (grouped-query) attention over the static cache.

    ``head_dim`` defaults to ``dim / n_head`` (Llama, LlamaGen); some checkpoints use another width.
    ``qkv_bias`` / ``out_bias`` add biases to the fused q/k/v and output projections (Qwen2).
    """

    def __init__(
        self,
        dim: int,
        n_head: int,
        n_kv_head: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
    ) -> None:
        super().__init__()
        if head_dim is None and dim % n_head:
            raise ValueError(f"dim ({dim}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.n_kv_head = n_kv_head or n_head
        self.head_dim = head_dim or dim // n_head
        self.wqkv = nn.Linear(dim, (n_head + 2 * self.n_kv_head) * self.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_head * self.head_dim, dim, bias=out_bias)

    def forward(
        self,
        x: torch.Tensor,  # [R, T, dim]   R = G*B physical rows
        freqs: torch.Tensor,  # [R, T, D/2, 2]
        cache: StaticKVCache,
        layer: int,
        slots: torch.Tensor,  # [B, T]
        attn_mask: torch.Tensor,  # [R, 1, T, S] bool (True = attend) or additive float (0 / -inf)
    ) -> torch.Tensor:
        rows, num_new, _ = x.shape
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        qkv = self.wqkv(x)
        # q and k share their positions: one rotation over both heads' groups (elementwise, so the
        # values are those of two separate rotations; half the ops per layer).
        qk = qkv[..., : q_dim + kv_dim].view(rows, num_new, self.n_head + self.n_kv_head, self.head_dim)
        q, k = apply_rotary_emb(qk, freqs).split([self.n_head, self.n_kv_head], dim=2)
        v = qkv[..., q_dim + kv_dim :].view(rows, num_new, self.n_kv_head, self.head_dim)
        keys, values = cache.write(layer, k.transpose(1, 2), v.transpose(1, 2), slots)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            keys.to(q.dtype),
            values.to(q.dtype),
            attn_mask=attn_mask,
            enable_gqa=self.n_kv_head != self.n_head,
        )
        return self.wo(out.transpose(1, 2).reshape(rows, num_new, q_dim))


class FeedForward(nn.Module):
    """SwiGLU MLP: ``w2(silu(w1 x) * w3 x)`` (Shazeer 2020)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm Llama block: ``h = x + attn(norm(x)); out = h + ffn(norm(h))``."""

    def __init__(
        self,
        dim: int,
        n_head: int,
        n_kv_head: int | None,
        hidden_dim: int,
        norm_eps: float,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
    ) -> None:
        super().__init__()
        self.attention = Attention(dim, n_head, n_kv_head, head_dim, qkv_bias, out_bias)
        self.feed_forward = FeedForward(dim, hidden_dim)
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.ffn_norm = RMSNorm(dim, norm_eps)

    def forward(self, x, freqs, cache, layer, slots, attn_mask):  # shapes as in Attention.forward
        h = x + self.attention(self.attention_norm(x), freqs, cache, layer, slots, attn_mask)
        return h + self.feed_forward(self.ffn_norm(h))


@dataclass(frozen=True)
class DecoderConfig:
    """Size of a :class:`DecoderLM` (a Llama-architecture causal LM)."""

    vocab_size: int
    dim: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None
    multiple_of: int = 64
    norm_eps: float = 1e-5
    rope_base: float = 10000.0

    @property
    def hidden_dim(self) -> int:
        return find_multiple(int(2 * 4 * self.dim / 3), self.multiple_of)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head


class DecoderLM(nn.Module):
    """A Llama-architecture causal LM over the static cache; satisfies the target contract."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(config.dim, config.n_head, config.n_kv_head, config.hidden_dim, config.norm_eps)
            for _ in range(config.n_layer)
        )
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def new_cache(self, batch_size: int, max_seq_len: int, cfg: bool = False) -> StaticKVCache:
        """Allocate a cache sized for this model on its device and dtype."""
        if cfg:
            raise ValueError("DecoderLM has no unconditional branch: classifier-free guidance is not available")
        p = self.output.weight
        return StaticKVCache(
            self.config.n_layer,
            batch_size,
            self.config.n_kv_head or self.config.n_head,
            max_seq_len,
            self.config.head_dim,
            dtype=p.dtype,
            device=p.device,
        )

    def forward(
        self,
        tokens: torch.Tensor,  # [B, T]
        positions: torch.Tensor,  # [B, T] sequence positions (tree nodes share their depth's position)
        cache: StaticKVCache,
        attn_mask: torch.Tensor | None = None,  # [B, 1, T, S]; None = causal over the new tokens
    ) -> TargetOutput:
        """Run ``tokens`` written at the next ``T`` cache slots; the cache is written, not committed."""
        slots = cache.slots(tokens.shape[1])
        if attn_mask is None:
            attn_mask = cache.attention_mask(slots)
        freqs = rope_frequencies(positions, self.config.head_dim, self.config.rope_base)
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, freqs, cache, i, slots, attn_mask)
        h = self.norm(h)
        return TargetOutput(logits=self.output(h).float(), hidden_states=h)

    def prefill(self, prompt: TokenPrompt, cache: StaticKVCache) -> PrefillOutput:
        """Write and commit a right-padded prompt batch; return each row's last-position output.

        Padding after a row's last real token is written but not committed, so it is invisible
        and later overwritten.
        """
        tokens = prompt.tokens
        lengths = prompt.lengths.to(tokens.device)
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        out = self.forward(tokens, positions, cache)
        cache.commit(lengths)
        last = (lengths - 1)[:, None]
        logits = out.logits.gather(1, last[..., None].expand(-1, -1, out.logits.shape[-1]))
        hidden = out.hidden_states.gather(1, last[..., None].expand(-1, -1, out.hidden_states.shape[-1]))
        return PrefillOutput(TargetOutput(logits=logits, hidden_states=hidden), hidden_states_all=out.hidden_states)

    def to_dict(self) -> dict:
        """Config as a plain dict (for saving next to the weights)."""
        return asdict(self.config)
