"""The language model of a VLM, converted from transformers into mmspec's static-cache decoder.

Why convert: drafting and verification need a static KV cache with per-row lengths (ragged
acceptance, rollback by moving a length), tree attention masks and a fast decode step; HF's
dynamic caches offer none of these. The HF weights (Llama / Mistral / Qwen2 / Qwen2-VL text
models) are copied onto LlamaGen-named blocks (``attention.wqkv``, ``attention.wo``,
``feed_forward.w1/w2/w3``) built from :mod:`mmspec.modeling` pieces, adding what the core
``Attention`` lacks: q/k/v (and output) biases, a head width other than ``dim / n_head``, the
checkpoint's rotary frequencies (scaled RoPE variants included) and M-RoPE (Qwen2-VL, Wang et al.
2024, arXiv 2409.12191).

RoPE layout. HF rotates the two halves of each head (``rotate_half``: element ``m`` pairs with
``m + d/2``); :func:`mmspec.modeling.apply_rotary_emb` rotates adjacent pairs ``(2m, 2m + 1)``.
Permuting the rows of ``q_proj`` / ``k_proj`` (weights and biases) per head so that HF element ``m``
lands at ``2m`` and ``m + d/2`` at ``2m + 1`` makes both compute the same attention scores: q·k is
unchanged when q and k are permuted alike, and values are not permuted (:func:`half_split_to_interleaved`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mmspec.cache import StaticKVCache
from mmspec.modeling import RMSNorm, TransformerBlock
from mmspec.types import TargetOutput

#: Key bucket of a language model's cache (:meth:`mmspec.cache.StaticKVCache.limit_keys`): one decode
#: step of SmolLM2-135M with 100 tokens in a 2,048-slot cache took 66.2 ms attending to every slot and
#: 52.3 ms to the first 128 (one CPU thread, ``benchmarks/lm_key_bucket.py``).
KEY_BUCKET = 128


class RopeOffsetKVCache(StaticKVCache):
    """A :class:`~mmspec.cache.StaticKVCache` that also stores each row's RoPE offset ``[B]``.

    M-RoPE gives image tokens 2-D positions, so after the prompt a row's RoPE position differs
    from its sequence position (= cache slot) by a constant: HF's ``rope_deltas``. The offset
    describes the cached sequence, so it lives with the cache, not on the model: targets and
    small-model drafters each keep their own cache and stay stateless. Zero for 1-D RoPE models.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rope_offsets = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)  # [B]

    def reset(self) -> None:
        """Forget every row, its RoPE offset included."""
        super().reset()
        self.rope_offsets.zero_()


@dataclass(frozen=True)
class VLMDecoderConfig:
    """Shape of a :class:`VLMDecoder` (a Llama-architecture causal LM with the options VLM language
    models need).

    Args:
        vocab_size: LM-head rows ``V``.
        dim: hidden width ``H``.
        n_layer, n_head, n_kv_head: blocks, query heads, key/value heads (GQA).
        head_dim: per-head width ``D`` (may differ from ``dim / n_head``).
        hidden_dim: SwiGLU inner width.
        norm_eps: RMSNorm epsilon.
        qkv_bias, out_bias: biases of the fused q/k/v projection and of the output projection.
        rope_scaling: factor on cos/sin (HF's ``attention_scaling``; 1 except for YaRN-like RoPE).
        mrope_section: M-RoPE split of the ``D/2`` frequency pairs into (t, h, w) sections, or None.
        tie_word_embeddings: the LM head shares the token embedding's weight.
        sliding_window: the checkpoint's attention window; longer sequences are refused (this
            decoder attends to the whole cache).
    """

    vocab_size: int
    dim: int
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    hidden_dim: int
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    out_bias: bool = False
    rope_scaling: float = 1.0
    mrope_section: tuple[int, ...] | None = None
    tie_word_embeddings: bool = False
    sliding_window: int | None = None


def pair_components(config: VLMDecoderConfig) -> torch.Tensor:
    """Which position component (0 = t, 1 = h, 2 = w) turns each of the ``D/2`` frequency pairs
    (``[D/2]`` long). HF cycles M-RoPE sections t, h, w, t, ... (``recomposition_frequencies``);
    1-D RoPE is one section, all component 0."""
    sections = config.mrope_section or (config.head_dim // 2,)
    return torch.tensor([i % 3 for i, size in enumerate(sections) for _ in range(size)], dtype=torch.long)


class VLMDecoder(nn.Module):
    """A VLM's language model over mmspec's static cache.

    ``inv_freq [D/2]`` is a buffer copied from the checkpoint's rotary module, so every RoPE variant
    whose frequencies do not depend on the sequence length (default, linear, llama3, YaRN) is exact.
    """

    def __init__(self, config: VLMDecoderConfig, inv_freq: torch.Tensor) -> None:
        super().__init__()
        if inv_freq.shape != (config.head_dim // 2,):
            raise ValueError(f"inv_freq must have shape ({config.head_dim // 2},), got {tuple(inv_freq.shape)}")
        if config.mrope_section is not None and sum(config.mrope_section) != config.head_dim // 2:
            raise ValueError(f"mrope_section {config.mrope_section} must sum to head_dim / 2 = {config.head_dim // 2}")
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        c = config
        self.layers = nn.ModuleList(
            TransformerBlock(c.dim, c.n_head, c.n_kv_head, c.hidden_dim, c.norm_eps, c.head_dim, c.qkv_bias, c.out_bias)
            for _ in range(c.n_layer)
        )
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", inv_freq.float().clone())  # [D/2]
        self.register_buffer("pair_component", pair_components(config), persistent=False)  # [D/2]

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def new_cache(self, batch_size: int, max_seq_len: int, cfg: bool = False) -> RopeOffsetKVCache:
        """An empty cache (with per-row RoPE offsets) on this model's device and dtype; decoding
        attends to its filled slots rounded up to :data:`KEY_BUCKET` (a language model's cache is
        sized for the longest reply it may write)."""
        if cfg:
            raise ValueError("a VLM has no unconditional branch: classifier-free guidance is not available")
        window = self.config.sliding_window
        if window is not None and max_seq_len > window:
            raise ValueError(
                f"sequences of {max_seq_len} tokens exceed this model's sliding attention window ({window}); "
                "mmspec's VLM decoder attends to the whole cache, so it cannot reproduce the windowed model"
            )
        p = self.output.weight
        return RopeOffsetKVCache(
            self.config.n_layer,
            batch_size,
            self.config.n_kv_head,
            max_seq_len,
            self.config.head_dim,
            dtype=p.dtype,
            device=p.device,
            key_bucket=KEY_BUCKET,
        )

    def rope(self, positions: torch.Tensor) -> torch.Tensor:
        """Rotary table ``[B, T, D/2, 2]`` (cos, sin) for RoPE ``positions``.

        ``positions``: ``[B, T]`` (1-D RoPE, or M-RoPE with t = h = w as for text tokens) or
        ``[3, B, T]`` (M-RoPE t, h, w ids). Pair ``i`` turns by ``pos[component(i)] * inv_freq[i]``.
        """
        if positions.dim() == 2:
            angles = positions.float()[..., None] * self.inv_freq  # [B, T, D/2]
        else:
            per_pair = positions.float().permute(1, 2, 0)[..., self.pair_component]  # [B, T, D/2]
            angles = per_pair * self.inv_freq
        scale = self.config.rope_scaling
        if scale == 1.0:  # every RoPE type but YaRN-like ones: two products by 1 less per forward
            return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
        return torch.stack([torch.cos(angles) * scale, torch.sin(angles) * scale], dim=-1)

    def forward(
        self,
        tokens: torch.Tensor,  # [B, T]
        positions: torch.Tensor,  # [B, T] or [3, B, T] RoPE positions
        cache: StaticKVCache,
        attn_mask: torch.Tensor | None = None,  # [B, 1, T, S]; None = causal over the new tokens
    ) -> TargetOutput:
        """Run ``tokens`` at the next ``T`` cache slots (written, not committed)."""
        return self.forward_embeds(self.tok_embeddings(tokens), positions, cache, attn_mask)

    def forward_embeds(
        self,
        embeds: torch.Tensor,  # [B, T, H] input embeddings (image features already merged)
        positions: torch.Tensor,  # [B, T] or [3, B, T] RoPE positions
        cache: StaticKVCache,
        attn_mask: torch.Tensor | None = None,  # [B, 1, T, S]; None = causal over the new tokens
    ) -> TargetOutput:
        """As :meth:`forward`, from input embeddings: logits ``[B, T, V]`` (float32) and features ``[B, T, H]``."""
        h = self.features(embeds, positions, cache, attn_mask)
        return TargetOutput(logits=self.output(h).float(), hidden_states=h)

    def features(
        self,
        embeds: torch.Tensor,  # [B, T, H] input embeddings
        positions: torch.Tensor,  # [B, T] or [3, B, T] RoPE positions
        cache: StaticKVCache,
        attn_mask: torch.Tensor | None = None,  # [B, 1, T, S]; None = causal over the new tokens
    ) -> torch.Tensor:
        """The final-norm features ``[B, T, H]`` without the LM head: callers that need logits at a few
        positions only (a prompt's last token) or over a reduced vocabulary apply their own head."""
        slots = cache.slots(embeds.shape[1])
        if attn_mask is None:
            attn_mask = cache.attention_mask(slots)
        freqs = self.rope(positions)
        h = embeds
        for i, layer in enumerate(self.layers):
            h = layer(h, freqs, cache, i, slots, attn_mask)
        return self.norm(h)

    @staticmethod
    def commit_prompt(
        features: torch.Tensor,  # [B, P, H] a right-padded prompt batch's features (just written)
        lengths: torch.Tensor,  # [B] each row's prompt length
        cache: StaticKVCache,
    ) -> torch.Tensor:
        """Commit each row's prompt to ``cache`` and return its last position's features ``[B, 1, H]``:
        prefill runs the LM head there only (over every prompt position a 49k-row head would cost more
        than the prompt's layers)."""
        lengths = lengths.to(features.device)
        cache.commit(lengths)
        return features.gather(1, (lengths - 1)[:, None, None].expand(-1, 1, features.shape[-1]))


class DraftVocabHead(nn.Module):
    """A draft model's LM head over a reduced draft vocabulary (EAGLE-3's ``d2t``; VocabTrim,
    arXiv 2506.22694): it scores ``ids [V']`` only and gives every other id logit ``-inf``.

    One ``[V', H]`` matmul per draft token instead of the full ``[V, H]`` head (SmolLM2: 49,152
    rows). Proposals stay target ids, so every acceptance rule stays lossless: a token outside
    ``ids`` is never proposed, and the rules accept or correct what is.

    Args:
        output: the full head (its selected rows are copied: the head keeps working unchanged).
        ids: ``[V']`` distinct target ids to score, each in ``[0, V)``.
    """

    def __init__(self, output: nn.Linear, ids: torch.Tensor | list[int]) -> None:
        super().__init__()
        vocab = output.out_features
        ids = torch.as_tensor(ids, dtype=torch.long, device=output.weight.device)
        if ids.dim() != 1 or len(ids) == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"draft_vocab must be a non-empty 1-D list of ids in [0, {vocab})")
        if len(ids.unique()) != len(ids):
            raise ValueError("draft_vocab lists an id twice")
        self.vocab_size = vocab
        self.register_buffer("ids", ids)
        self.weight = nn.Parameter(output.weight.detach()[ids].clone(), requires_grad=False)  # [V', H]

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, T, V] float32
        scores = nn.functional.linear(h, self.weight).float()  # [B, T, V']
        full = scores.new_full((*scores.shape[:-1], self.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.ids, scores)


# --------------------------------------------------------------------------- conversion from HF


@dataclass(frozen=True)
class TextArchitecture:
    """How one HF text-model family maps onto :class:`VLMDecoderConfig` (biases read from its config)."""

    qkv_bias: Callable[[object], bool]
    out_bias: Callable[[object], bool]
    mrope: bool = False


#: HF text ``model_type`` -> its mapping. Llama's ``attention_bias`` covers q, k, v and o; Qwen2
#: always has q/k/v biases and no output bias.
TEXT_ARCHITECTURES: dict[str, TextArchitecture] = {
    "llama": TextArchitecture(qkv_bias=lambda c: c.attention_bias, out_bias=lambda c: c.attention_bias),
    "mistral": TextArchitecture(qkv_bias=lambda c: False, out_bias=lambda c: False),
    "qwen2": TextArchitecture(qkv_bias=lambda c: True, out_bias=lambda c: False),
    "qwen2_vl_text": TextArchitecture(qkv_bias=lambda c: True, out_bias=lambda c: False, mrope=True),
    "qwen2_5_vl_text": TextArchitecture(qkv_bias=lambda c: True, out_bias=lambda c: False, mrope=True),
}

#: RoPE variants whose frequencies are fixed (``dynamic`` rescales with the sequence length).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def half_split_to_interleaved(weight: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Permute q/k projection rows (``[n_heads * D, ...]`` weight or ``[n_heads * D]`` bias) from
    HF's half-split RoPE layout to the interleaved one: per head, row ``m`` -> ``2m`` and row
    ``m + D/2`` -> ``2m + 1`` (the Meta <-> HF Llama permutation, inverted)."""
    rest = weight.shape[1:]
    return weight.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(n_heads * head_dim, *rest)


def decoder_config_from_hf(text_config, tie_word_embeddings: bool, rope_scaling: float) -> VLMDecoderConfig:
    """Read a :class:`VLMDecoderConfig` off an HF text config; unsupported features raise ``ValueError``."""
    arch = TEXT_ARCHITECTURES.get(text_config.model_type)
    if arch is None:
        raise ValueError(
            f"unsupported language model {text_config.model_type!r}; supported: {', '.join(sorted(TEXT_ARCHITECTURES))}"
        )
    if text_config.hidden_act != "silu":
        raise ValueError(f"only SwiGLU (silu) MLPs are supported, this model uses {text_config.hidden_act!r}")
    if getattr(text_config, "mlp_bias", False):
        raise ValueError("MLP biases are not supported")
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    mrope_section = None
    if arch.mrope:
        mrope_section = tuple(int(s) for s in text_config.rope_parameters["mrope_section"])
    return VLMDecoderConfig(
        vocab_size=text_config.vocab_size,
        dim=text_config.hidden_size,
        n_layer=text_config.num_hidden_layers,
        n_head=text_config.num_attention_heads,
        n_kv_head=text_config.num_key_value_heads or text_config.num_attention_heads,
        head_dim=head_dim,
        hidden_dim=text_config.intermediate_size,
        norm_eps=text_config.rms_norm_eps,
        qkv_bias=arch.qkv_bias(text_config),
        out_bias=arch.out_bias(text_config),
        rope_scaling=rope_scaling,
        mrope_section=mrope_section,
        tie_word_embeddings=tie_word_embeddings,
        sliding_window=getattr(text_config, "sliding_window", None),
    )


def convert_language_model(language_model: nn.Module, lm_head: nn.Linear, text_config) -> VLMDecoder:
    """Copy an HF text model (``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``) and its LM head
    into a new :class:`VLMDecoder` with the same dtype and device.

    Args:
        language_model: the HF base text model (``model.model.language_model`` of a VLM).
        lm_head: the VLM's output projection (may share the embedding's weight).
        text_config: the HF text config (``config.text_config``).
    """
    rotary = language_model.rotary_emb
    if rotary.rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(
            f"RoPE type {rotary.rope_type!r} is not supported (frequencies must not depend on the sequence "
            f"length); supported: {', '.join(STATIC_ROPE_TYPES)}"
        )
    tied = lm_head.weight.data_ptr() == language_model.embed_tokens.weight.data_ptr()
    config = decoder_config_from_hf(text_config, tie_word_embeddings=tied, rope_scaling=float(rotary.attention_scaling))
    hf = language_model.state_dict()
    ours = {
        "tok_embeddings.weight": hf["embed_tokens.weight"],
        "norm.weight": hf["norm.weight"],
        "output.weight": lm_head.weight.detach(),
        "inv_freq": rotary.inv_freq.float().clone(),
    }
    for i in range(config.n_layer):
        n = f"layers.{i}."  # the same layer prefix on both sides
        q = half_split_to_interleaved(hf[n + "self_attn.q_proj.weight"], config.n_head, config.head_dim)
        k = half_split_to_interleaved(hf[n + "self_attn.k_proj.weight"], config.n_kv_head, config.head_dim)
        ours[n + "attention.wqkv.weight"] = torch.cat([q, k, hf[n + "self_attn.v_proj.weight"]], 0)
        if config.qkv_bias:
            qb = half_split_to_interleaved(hf[n + "self_attn.q_proj.bias"], config.n_head, config.head_dim)
            kb = half_split_to_interleaved(hf[n + "self_attn.k_proj.bias"], config.n_kv_head, config.head_dim)
            ours[n + "attention.wqkv.bias"] = torch.cat([qb, kb, hf[n + "self_attn.v_proj.bias"]], 0)
        ours[n + "attention.wo.weight"] = hf[n + "self_attn.o_proj.weight"]
        if config.out_bias:
            ours[n + "attention.wo.bias"] = hf[n + "self_attn.o_proj.bias"]
        ours[n + "feed_forward.w1.weight"] = hf[n + "mlp.gate_proj.weight"]
        ours[n + "feed_forward.w3.weight"] = hf[n + "mlp.up_proj.weight"]
        ours[n + "feed_forward.w2.weight"] = hf[n + "mlp.down_proj.weight"]
        ours[n + "attention_norm.weight"] = hf[n + "input_layernorm.weight"]
        ours[n + "ffn_norm.weight"] = hf[n + "post_attention_layernorm.weight"]
    device = language_model.embed_tokens.weight.device
    # Built on the meta device and filled by assignment: no random init of a multi-GB model, the
    # checkpoint's dtype is kept, and unchanged tensors are shared with the HF model, not copied.
    with torch.device("meta"):
        decoder = VLMDecoder(config, torch.zeros(config.head_dim // 2))
    decoder.load_state_dict(ours, strict=True, assign=True)
    if tied:  # assignment replaced the shared parameter by two: share it again
        decoder.output.weight = decoder.tok_embeddings.weight
    decoder.pair_component = pair_components(config).to(device)
    return decoder.eval()
