"""EAGLE-3 drafting (Li et al. 2025, "EAGLE-3: Scaling up Inference Acceleration of Large Language
Models via Training-Time Test", arXiv 2503.01840), in the layout vLLM and SGLang serve.

Differences from EAGLE / EAGLE-2 (:mod:`mmspec.drafters.eagle`), all from the paper (Sec. 3):

- **Multi-layer features.** The target exposes the outputs of three of its layers (low, middle,
  high); ``fc`` fuses their concatenation ``a_t = [l_t ; m_t ; h_t]`` (``3 * H_target``) into one
  ``H``-wide feature ``g_t = fc(a_t)`` (Sec. 3.2, Fig. 5). :class:`AuxFeatureTarget` wraps any
  mmspec target with a ``layers`` stack so that its ``hidden_states`` *are* ``a_t``.
- **Direct token prediction.** No feature regression: the head's own LM head (over a reduced draft
  vocabulary) predicts the next token; its pre-norm output is fed back as the next step's feature.
- **One decoder layer over ``2H`` inputs.** Entry ``t`` reads ``[input_layernorm(embed(x_{t+1})) ;
  hidden_norm(g_t)]`` -- q/k/v take ``2H`` inputs; the residual is the un-normalised ``g_t``
  (vLLM's ``llama_eagle3.py``; its ``norm_before_residual = False`` default):

      r = g_t ;  h = r + o_proj(attn([in_norm(e) ; hid_norm(g_t)]))
      out = h + mlp(post_attention_layernorm(h))        (pre-norm feature fed back)
      logits = lm_head(norm(out))                       [draft_vocab]

- **Reduced draft vocabulary** (also VocabTrim, Goel et al. 2025, arXiv 2506.22694): ``lm_head`` has
  ``draft_vocab_size`` rows, the most frequent target tokens of the training data; ``d2t[i]`` is an
  **offset**: draft id ``i`` is target id ``i + d2t[i]``; ``t2d`` ``[vocab_size]`` bool marks the target
  ids in the draft vocabulary. Draft logits are scattered into the target vocabulary with ``-inf``
  elsewhere, so acceptance, temperature, top-k/p run over the target's vocabulary unchanged
  (lossless: tokens outside the draft vocabulary simply have ``q = 0``).
- **Training-time test** (Sec. 3.1, Fig. 6): the head is trained on its own unrolled predictions
  (:func:`eagle3_ttt_loss` in :mod:`mmspec.training.eagle3`).

Layer-id convention: mmspec names an auxiliary layer by the **output of decoder layer k** (0-based;
SGLang's and SpecForge's reading of ``eagle_aux_hidden_state_layer_ids``). vLLM reads the same id as
the hidden state *entering* layer k (= the output of layer k - 1); :mod:`mmspec.drafters.eagle3_format`
converts on export / import.

Cache layout and drafting are EAGLE's (:class:`~mmspec.drafters.eagle.EagleDrafter`: pair
``(g_t, x_{t+1})`` at slot ``t``, catch-up, chains, EAGLE-2 trees, rollback); the head's cache also
stores a per-row RoPE offset (M-RoPE targets: Qwen2-VL / Qwen2.5-VL text after the prompt has
``t = h = w = position + offset``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..cache import StaticKVCache
from ..checkpoint_io import read_json, read_safetensors
from ..modeling import RMSNorm
from ..types import DraftContext, PrefillOutput, TargetOutput, TokenPrompt
from ..weights_check import load_checked
from .eagle import CONFIG_NAME, WEIGHTS_NAME, EagleDrafter, TreeConfig, target_fingerprint

#: ``config.json`` key that tells an mmspec EAGLE-3 head from the other heads saved by mmspec.
ARCH_KEY = "mmspec_arch"
ARCH = "eagle3"
TREE_NAME = "tree.json"


@dataclass(frozen=True)
class Eagle3Config:
    """Sizes of an :class:`Eagle3Head` and the target it belongs to.

    Args:
        hidden_size: the head's width ``H``.
        target_hidden_size: the target's width ``H_t`` (``fc`` takes ``3 * H_t``).
        num_attention_heads, num_key_value_heads, head_dim: the head's attention (q/k/v take ``2H``).
        intermediate_size: SwiGLU width.
        vocab_size: the target's vocabulary ``V``.
        draft_vocab_size: rows of the head's LM head ``V_d <= V``.
        aux_layer_ids: the three target layers whose **outputs** are fused (0-based; SGLang/SpecForge).
        target_name: names the target (LM-head fingerprint; checked on loading).
        target_num_layers: the target's decoder layers (the ids must be below it).
        rms_norm_eps, rope_theta: as the target's.
        mrope_section: M-RoPE split of the ``head_dim / 2`` frequencies into (t, h, w), or None.
        max_position_embeddings: the longest sequence (>= the target's context).
        shares_embedding: the token embedding is the target's (not saved); False: the head owns
            ``embed_tokens`` (e.g. imported from a file that ships one).
        target_model_type: the target's HF ``model_type`` (exported for Qwen2.5-VL targets).
    """

    hidden_size: int
    target_hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    draft_vocab_size: int
    aux_layer_ids: tuple[int, int, int]
    target_name: str
    target_num_layers: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    mrope_section: tuple[int, ...] | None = None
    max_position_embeddings: int = 4096
    shares_embedding: bool = True
    target_model_type: str | None = None

    def __post_init__(self) -> None:
        if len(self.aux_layer_ids) != 3:
            raise ValueError(f"EAGLE-3 fuses exactly three target layers, got aux_layer_ids={self.aux_layer_ids}")
        if not all(0 <= i < self.target_num_layers for i in self.aux_layer_ids):
            raise ValueError(
                f"aux_layer_ids {self.aux_layer_ids} must name layers of the target (0 .. {self.target_num_layers - 1})"
            )
        if not 1 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(
                f"draft_vocab_size must be in [1, vocab_size={self.vocab_size}], got {self.draft_vocab_size}"
            )
        if self.mrope_section is not None and sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim / 2 = {self.head_dim // 2}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Eagle3Config:
        data = {k: v for k, v in data.items() if k != ARCH_KEY}
        data["aux_layer_ids"] = tuple(data["aux_layer_ids"])
        if data.get("mrope_section") is not None:
            data["mrope_section"] = tuple(data["mrope_section"])
        return cls(**data)


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's default low / middle / high layers as outputs of layers ``(1, N/2 - 1, N - 4)``
    (SpecForge; SGLang captures before layers ``(2, N/2, N - 3)``, the same states), clamped into
    ``[0, N - 1]`` for tiny targets."""
    ids = (1, num_layers // 2 - 1, num_layers - 4)
    return tuple(min(max(i, 0), num_layers - 1) for i in ids)  # type: ignore[return-value]


# --------------------------------------------------------------------------- targets with aux features


def decoder_layers(target: Any) -> nn.ModuleList:
    """The decoder-layer stack of an mmspec target: ``target.layers`` (``DecoderLM``) or
    ``target.decoder.layers`` (VLM targets, converted LMs)."""
    for owner in (target, getattr(target, "decoder", None)):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(
        f"{type(target).__name__} exposes no decoder layers (.layers or .decoder.layers): EAGLE-3 needs them"
    )


class AuxFeatureTarget:
    """A target whose ``hidden_states`` are the EAGLE-3 features ``[l ; m ; h]`` (``[.., 3 * H_t]``):
    the outputs of ``layer_ids`` (0-based) concatenated, captured by forward hooks on the wrapped
    target's layers during its own ``prefill`` / ``forward`` (the target's code is not changed).

    ``include_final``: also append the target's own final feature (``[.., 4 * H_t]``; training needs
    the target's next-token distribution). Every other attribute is the wrapped target's.
    """

    def __init__(self, target: Any, layer_ids: tuple[int, ...], include_final: bool = False) -> None:
        self.target = target
        self.layer_ids = tuple(layer_ids)
        self.include_final = include_final
        self._layers = decoder_layers(target)
        if not all(0 <= i < len(self._layers) for i in self.layer_ids):
            raise ValueError(f"aux layers {self.layer_ids} do not exist in a target with {len(self._layers)} layers")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)

    def _capture(self) -> tuple[list, list[torch.Tensor | None]]:
        captured: list[torch.Tensor | None] = [None] * len(self.layer_ids)
        handles = []
        for slot, index in enumerate(self.layer_ids):

            def hook(module, args, output, slot=slot):
                captured[slot] = output

            handles.append(self._layers[index].register_forward_hook(hook))
        return handles, captured

    def _features(self, captured: list[torch.Tensor], final: torch.Tensor | None) -> torch.Tensor:
        parts = list(captured) + ([final] if self.include_final else [])
        return torch.cat([p.to(parts[0].dtype) for p in parts], -1)

    def forward(self, tokens, positions, cache, attn_mask) -> TargetOutput:
        handles, captured = self._capture()
        try:
            out = self.target.forward(tokens, positions, cache, attn_mask)
        finally:
            for handle in handles:
                handle.remove()
        return replace(out, hidden_states=self._features(captured, out.hidden_states))  # [B, T, 3H_t (+H_t)]

    __call__ = forward

    def prefill(self, prompt, cache) -> PrefillOutput:
        handles, captured = self._capture()
        try:
            pre = self.target.prefill(prompt, cache)
        finally:
            for handle in handles:
                handle.remove()
        if pre.hidden_states_all is None:
            raise ValueError("EAGLE-3 needs the target's prompt features: its prefill returns no hidden_states_all")
        full = self._features(captured, pre.hidden_states_all)  # [B, P, 3H_t (+H_t)]
        last = (cache.lengths - 1).clamp(min=0)[:, None, None].expand(-1, 1, full.shape[-1])
        return replace(pre, output=replace(pre.output, hidden_states=full.gather(1, last)), hidden_states_all=full)


# --------------------------------------------------------------------------- the head


class Eagle3Cache(StaticKVCache):
    """The head's one-layer cache plus a per-row RoPE offset ``[B]`` (RoPE id - slot of the text
    after the prompt: HF's M-RoPE ``rope_deltas``; zero for 1-D RoPE)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rope_offsets = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)

    def reset(self) -> None:
        super().reset()
        self.rope_offsets.zero_()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


class Eagle3Attention(nn.Module):
    """Llama attention whose q/k/v read ``2H`` inputs; HF's half-split RoPE (``rotate_half``), so the
    weights are the serving format's ``q_proj`` / ``k_proj`` without permutation."""

    def __init__(self, config: Eagle3Config) -> None:
        super().__init__()
        c = config
        self.n_head, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(2 * c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """``x [B, T, 2H]``, ``cos/sin [B, T, D]`` -> rotated ``q [B, h, T, D]``, ``k, v [B, h_kv, T, D]``."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def attend(self, q, keys, values, mask) -> torch.Tensor:
        """``q [B, h, T, D]`` over ``keys/values [B, h_kv, S, D]`` with ``mask [B, 1, T, S]`` -> ``[B, T, H]``."""
        out = F.scaled_dot_product_attention(
            q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, enable_gqa=self.n_kv != self.n_head
        )
        return self.o_proj(out.transpose(1, 2).flatten(2))


class Eagle3MLP(nn.Module):
    def __init__(self, config: Eagle3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Eagle3Layer(nn.Module):
    """The single decoder layer (``midlayer``); parameter names are the serving format's."""

    def __init__(self, config: Eagle3Config) -> None:
        super().__init__()
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Eagle3Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Eagle3MLP(config)

    def inputs(self, embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``[in_norm(e) ; hidden_norm(g)]`` ``[B, T, 2H]``."""
        return torch.cat([self.input_layernorm(embeds), self.hidden_norm(features)], -1)

    def finish(self, features: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Residual (the un-normalised ``g``), then the MLP block: the pre-norm output ``[B, T, H]``."""
        h = features + attn_out
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Head(nn.Module):
    """The EAGLE-3 draft head: ``fc``, one :class:`Eagle3Layer` (``midlayer``), ``norm``, ``lm_head``
    over the draft vocabulary, and the ``d2t`` / ``t2d`` maps (buffers).

    Args:
        config: sizes and the target's name.
        embed: the target's token embedding ``[V, H]`` (shared, frozen, not saved) when
            ``config.shares_embedding``; otherwise the head owns ``embed_tokens``.
    """

    def __init__(self, config: Eagle3Config, embed: nn.Embedding | None = None) -> None:
        super().__init__()
        self.config = config
        c = config
        if c.shares_embedding:
            if embed is None or tuple(embed.weight.shape) != (c.vocab_size, c.hidden_size):
                got = None if embed is None else list(embed.weight.shape)
                raise ValueError(
                    f"this EAGLE-3 head shares the target's token embedding [{c.vocab_size}, {c.hidden_size}]; got {got}"
                )
            self._shared_embed = (embed,)  # a tuple: not registered, neither trained nor saved
        else:
            self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
            self._shared_embed = None
        self.fc = nn.Linear(3 * c.target_hidden_size, c.hidden_size, bias=False)
        self.midlayer = Eagle3Layer(c)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))  # target id = i + d2t[i]
        self.register_buffer("t2d", torch.zeros(c.vocab_size, dtype=torch.bool))
        self.set_draft_vocab(torch.arange(c.draft_vocab_size))
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [D/2]
        sections = c.mrope_section or (c.head_dim // 2,)
        component = torch.tensor([i % 3 for i, size in enumerate(sections) for _ in range(size)])
        self.register_buffer("rope_component", component, persistent=False)  # [D/2]: t / h / w of each pair

    # ------------------------------------------------------------------ vocabulary
    def set_draft_vocab(self, target_ids: torch.Tensor) -> None:
        """Make ``target_ids`` (``[V_d]``, distinct, ascending) the draft vocabulary: ``d2t`` offsets
        and the ``t2d`` mask."""
        ids = target_ids.to(self.d2t.device, torch.long)
        if ids.shape != (self.config.draft_vocab_size,) or not bool((ids[1:] > ids[:-1]).all()):
            raise ValueError(
                f"the draft vocabulary must be {self.config.draft_vocab_size} distinct ascending target ids"
            )
        if int(ids[0]) < 0 or int(ids[-1]) >= self.config.vocab_size:
            raise ValueError(f"draft vocabulary ids must lie in [0, {self.config.vocab_size})")
        self.d2t.copy_(ids - torch.arange(len(ids), device=ids.device))
        self.t2d.zero_()
        self.t2d[ids] = True

    @property
    def draft_to_target(self) -> torch.Tensor:
        """``[V_d]`` target id of each draft id (``i + d2t[i]``)."""
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t

    # ------------------------------------------------------------------ forward
    @property
    def embedding(self) -> torch.Tensor:
        return self._shared_embed[0].weight.detach() if self._shared_embed is not None else self.embed_tokens.weight

    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        """``[.., 3 H_t]`` target features ``[l ; m ; h]`` -> ``g = fc(.)`` ``[.., H]`` (Sec. 3.2)."""
        width = 3 * self.config.target_hidden_size
        if aux.shape[-1] != width:
            raise ValueError(
                f"EAGLE-3 features must be the concatenation of three target layers ({width} wide), got "
                f"{aux.shape[-1]}: run the target through AuxFeatureTarget (drafter.features_target(target))"
            )
        return self.fc(aux[..., :width].to(self.fc.weight.dtype))

    def rope(self, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE ids ``[B, T]`` (t = h = w) or ``[3, B, T]`` (M-RoPE) -> ``cos, sin`` ``[B, T, D]`` (half-split)."""
        if rope.dim() == 2:
            angles = rope.float()[..., None] * self.inv_freq  # [B, T, D/2]
        else:
            angles = rope.float().permute(1, 2, 0)[..., self.rope_component] * self.inv_freq
        angles = torch.cat([angles, angles], -1)
        return angles.cos(), angles.sin()

    def forward(
        self,
        tokens: torch.Tensor,  # [B, T] x_{t+1}
        features: torch.Tensor,  # [B, T, H] g_t (fused target features or the head's own outputs)
        positions: torch.Tensor,  # [B, T] sequence positions (= cache slots)
        cache: Eagle3Cache,
        slots: torch.Tensor,  # [B, T]
        attn_mask: torch.Tensor,  # [B, 1, T, S]
    ) -> torch.Tensor:
        """The pre-norm outputs ``[B, T, H]`` (EagleDrafter's call; RoPE id = position + the row's offset)."""
        return self.forward_rope(tokens, features, positions + cache.rope_offsets[:, None], cache, slots, attn_mask)

    def forward_rope(self, tokens, features, rope, cache, slots, attn_mask) -> torch.Tensor:
        """As :meth:`forward` with explicit RoPE ids ``rope`` ``[B, T]`` or ``[3, B, T]``."""
        if cache.groups != 1:
            raise ValueError("EAGLE-3 heads do not support classifier-free guidance (one group)")
        dtype = self.fc.weight.dtype
        embeds = F.embedding(tokens, self.embedding).to(dtype)
        features = features.to(dtype)
        cos, sin = self.rope(rope)
        q, k, v = self.midlayer.self_attn.qkv(self.midlayer.inputs(embeds, features), cos, sin)
        keys, values = cache.write(0, k, v, slots)
        return self.midlayer.finish(features, self.midlayer.self_attn.attend(q, keys, values, attn_mask))

    def draft_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Pre-norm outputs ``[.., H]`` -> float32 logits over the draft vocabulary ``[.., V_d]``."""
        return self.lm_head(self.norm(features.to(self.fc.weight.dtype))).float()

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Pre-norm outputs ``[.., H]`` -> float32 logits over the **target** vocabulary ``[.., V]``:
        draft id ``i`` lands at ``i + d2t[i]``, every other id is ``-inf`` (probability 0)."""
        small = self.draft_logits(features)
        full = small.new_full((*small.shape[:-1], self.config.vocab_size), float("-inf"))
        return full.index_copy(-1, self.draft_to_target, small)

    def new_cache(self, batch_size: int, max_seq_len: int, groups: int = 1) -> Eagle3Cache:
        if groups != 1:
            raise ValueError("EAGLE-3 heads do not support classifier-free guidance (one group)")
        weight = self.fc.weight
        c = self.config
        return Eagle3Cache(
            1, batch_size, c.num_key_value_heads, max_seq_len, c.head_dim, dtype=weight.dtype, device=weight.device
        )

    # ------------------------------------------------------------------ save / load (mmspec's own layout)
    def save_pretrained(self, directory: str | Path) -> None:
        """``config.json`` (``Eagle3Config`` + ``"mmspec_arch": "eagle3"``) and ``model.safetensors``
        with the serving format's tensor names (``fc``, ``midlayer.*``, ``norm``, ``lm_head``, ``d2t``,
        ``t2d``; ``embed_tokens`` only when the head owns it)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, directory / WEIGHTS_NAME)
        (directory / CONFIG_NAME).write_text(json.dumps({ARCH_KEY: ARCH, **asdict(self.config)}, indent=2))

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, embed: nn.Embedding | None, target_name: str | None = None
    ) -> Eagle3Head:
        """Load a head saved by :meth:`save_pretrained`; ``target_name`` (the target's LM-head
        fingerprint) must match the saved one when given."""
        directory = Path(directory)
        data = read_json(directory / CONFIG_NAME)
        if data.get(ARCH_KEY) != ARCH:
            raise ValueError(f'{directory} holds no mmspec EAGLE-3 head (config.json has no "{ARCH_KEY}": "{ARCH}")')
        config = Eagle3Config.from_dict(data)
        if target_name is not None and config.target_name != target_name:
            raise ValueError(
                f"the EAGLE-3 head in {directory} was trained for target {config.target_name!r}, not {target_name!r}; "
                "train one for this target (mmspec train-drafter --arch eagle3)"
            )
        head = cls(config, embed)
        load_checked(head, read_safetensors(directory / WEIGHTS_NAME), "the EAGLE-3 head", str(directory))
        return head.to(embed.weight.device if embed is not None else "cpu")


def eagle3_config_for(
    target_hidden_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    intermediate_size: int,
    vocab_size: int,
    num_layers: int,
    target_name: str,
    draft_vocab_size: int | None = None,
    aux_layer_ids: tuple[int, int, int] | None = None,
    **extra,
) -> Eagle3Config:
    """A head as wide as its target (the engines' convention: the draft config mirrors the target's)."""
    return Eagle3Config(
        hidden_size=target_hidden_size,
        target_hidden_size=target_hidden_size,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        draft_vocab_size=draft_vocab_size or vocab_size,
        aux_layer_ids=aux_layer_ids or default_aux_layers(num_layers),
        target_name=target_name,
        target_num_layers=num_layers,
        **extra,
    )


def eagle3_head_for_lm(target: Any, draft_vocab_size: int | None = None, aux_layer_ids=None) -> Eagle3Head:
    """A fresh head for an engine :class:`~mmspec.modeling.DecoderLM` target (shares its embedding)."""
    c = target.config
    config = eagle3_config_for(
        c.dim,
        c.n_head,
        c.n_kv_head or c.n_head,
        c.head_dim,
        c.hidden_dim,
        target.vocab_size,
        c.n_layer,
        target_fingerprint(target.output),
        draft_vocab_size,
        aux_layer_ids,
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_base,
    )
    return Eagle3Head(config, target.tok_embeddings).to(target.output.weight.device)


# --------------------------------------------------------------------------- the drafter


class Eagle3Drafter(EagleDrafter):
    """EAGLE-3 chains and EAGLE-2 dynamic trees through :class:`~mmspec.drafters.eagle.EagleDrafter`.

    Args:
        head: the trained head.
        tree: None for chains; a :class:`~mmspec.drafters.eagle.TreeConfig` for EAGLE-2 trees.

    The loop must run the target as :meth:`features_target` returns it (its features are the three
    layers EAGLE-3 fuses); pipelines do so for every drafter that has this method. Prompt RoPE ids
    come from the target's ``rope_positions(prompt)`` when it has one (M-RoPE VLMs), else the slots.
    """

    def __init__(self, head: Eagle3Head, tree: TreeConfig | None = None) -> None:
        if tree is not None and tree.top_k > head.config.draft_vocab_size:
            raise ValueError(
                f"tree top_k={tree.top_k} exceeds the draft vocabulary ({head.config.draft_vocab_size} tokens)"
            )
        super().__init__(head, tree)
        self._rope_source: Any = None

    def features_target(self, target: Any) -> AuxFeatureTarget:
        """``target`` wrapped so that its features are ``[l ; m ; h]`` of the head's layers. The target
        is checked against the head's fingerprint once (hashing a large LM head takes a while)."""
        name = self.head.config.target_name if target is self._rope_source else target_fingerprint(_lm_head(target))
        if name != self.head.config.target_name:
            raise ValueError(
                f"this EAGLE-3 head was trained for target {self.head.config.target_name!r}, not {name!r} "
                "(the LM-head fingerprints differ)"
            )
        self._rope_source = target
        return AuxFeatureTarget(target, self.head.config.aux_layer_ids)

    def prefill(self, ctx: DraftContext, prompt: Any, prefill: PrefillOutput) -> None:
        """Fuse the prompt's features and run its pairs ``(g_t, x_{t+1})`` into a fresh cache (all but
        the newest, which the first ``draft`` runs as its catch-up)."""
        if ctx.sampling.uses_cfg:
            raise ValueError("EAGLE-3 drafting does not support classifier-free guidance")
        if prefill.hidden_states_all is None:
            raise ValueError("EAGLE-3 needs the target's prompt features: PrefillOutput.hidden_states_all is None")
        features = self.head.fuse(prefill.hidden_states_all)  # [B, P, H]
        batch, width, _ = features.shape
        tree_slots = 0 if self.tree is None else self.tree.window + self.tree.depth
        capacity = int(ctx.positions.max()) + 2 * ctx.history.shape[1] + tree_slots + 2  # deliberate sync: once
        self.cache = self.head.new_cache(batch, capacity)
        rope_positions = getattr(self._rope_source, "rope_positions", None)
        if rope_positions is not None and isinstance(prompt, TokenPrompt):
            rope, offsets = rope_positions(prompt)  # [B, P] or [3, B, P]; [B]
            self.cache.rope_offsets.copy_(offsets)
        else:
            rope = torch.arange(width, device=features.device).expand(batch, -1)
        history = ctx.history
        tokens = history[:, 1 : width + 1].clamp(min=0)  # x_{t+1} (the token after position t)
        if tokens.shape[1] < width:
            tokens = torch.cat([tokens, tokens.new_zeros(batch, width - tokens.shape[1])], 1)
        slots = self.cache.slots(width)
        self.head.forward_rope(tokens, features, rope, self.cache, slots, self.cache.attention_mask(slots))
        self.cache.commit(ctx.positions - ctx.num_new)

    def _catch_up(self, ctx: DraftContext):
        """EAGLE's catch-up on the fused features of the last step's committed tokens."""
        return super()._catch_up(replace(ctx, hidden_states=self.head.fuse(ctx.hidden_states)))

    def save_pretrained(self, directory: str | Path) -> None:
        self.head.save_pretrained(directory)
        if self.tree is not None:
            (Path(directory) / TREE_NAME).write_text(json.dumps(asdict(self.tree)))

    @classmethod
    def from_pretrained(cls, directory: str | Path, target: Any, tree: TreeConfig | None = None) -> Eagle3Drafter:
        """Load a drafter saved by :meth:`save_pretrained` for ``target`` (checked by fingerprint)."""
        head = Eagle3Head.from_pretrained(directory, _embedding(target), target_fingerprint(_lm_head(target)))
        tree_file = Path(directory) / TREE_NAME
        if tree is None and tree_file.is_file():
            tree = TreeConfig(**read_json(tree_file))
        return cls(head.to(_lm_head(target).weight.device).eval(), tree)


def _lm_head(target: Any) -> nn.Linear:
    owner = getattr(target, "decoder", target)
    return owner.output


def _embedding(target: Any) -> nn.Embedding:
    owner = getattr(target, "decoder", target)
    return owner.tok_embeddings
