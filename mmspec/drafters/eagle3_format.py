"""The on-disk EAGLE-3 draft format vLLM and SGLang load (and SpecForge writes), read and written.

A directory with two files:

``config.json`` -- a Llama config: ``architectures: ["LlamaForCausalLMEagle3"]``, ``model_type:
"llama"``, ``num_hidden_layers: 1``, ``hidden_size``, ``intermediate_size``, ``num_attention_heads``,
``num_key_value_heads``, ``head_dim``, ``rms_norm_eps``, ``rope_theta``, ``max_position_embeddings``
(>= the target's context), ``vocab_size`` (the **target's**), ``draft_vocab_size``,
``target_hidden_size``, ``eagle_config: {"eagle_aux_hidden_state_layer_ids": [a, b, c],
"use_aux_hidden_state": true}``; for M-RoPE targets (Qwen2-VL / Qwen2.5-VL) ``rope_scaling: {"type":
"mrope", "mrope_section": [t, h, w]}`` and ``target_model_type``. mmspec adds an ``"mmspec"`` block
(target fingerprint, target layer count, the layer-id convention written); engines ignore it.

``model.safetensors`` -- ``fc.weight [H, 3 * H_target]`` (no bias), ``midlayer.hidden_norm.weight``,
``midlayer.input_layernorm.weight``, ``midlayer.self_attn.{q,k,v}_proj.weight [*, 2H]``,
``midlayer.self_attn.o_proj.weight``, ``midlayer.post_attention_layernorm.weight``,
``midlayer.mlp.{gate,up,down}_proj.weight``, ``norm.weight``, ``lm_head.weight [draft_vocab, H]``,
``d2t [draft_vocab]`` int64 **offsets** (target id = ``i + d2t[i]``), ``t2d [vocab]`` bool; optionally
``embed_tokens.weight [vocab, H]`` (absent: the engines share the target's embedding, as mmspec does).

**Layer ids.** SGLang (``layers_to_capture = [id + 1 ...]``, capturing the state entering layer
``id + 1``) and SpecForge read an id as the **output of layer id**; vLLM captures the residual stream
*entering* layer ``id`` (the output of layer ``id - 1``). mmspec's heads record outputs
(:mod:`mmspec.drafters.eagle3`). :func:`write_eagle3` writes ``layer_convention="sglang"`` by default
(the ids are the layers' outputs: a SpecForge-trained draft's file reads the same) and
``"vllm"`` writes ``id + 1`` so that vLLM captures the same states; the convention written is
recorded in ``config["mmspec"]["layer_convention"]``. :func:`read_eagle3` uses that record, or its
``layer_convention`` argument for files written elsewhere (default ``"sglang"``: SpecForge's files).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..checkpoint_io import read_json, read_safetensors
from .eagle import target_fingerprint
from .eagle3 import Eagle3Config, Eagle3Head, decoder_layers, default_aux_layers

ARCHITECTURE = "LlamaForCausalLMEagle3"
LAYER_CONVENTIONS = ("sglang", "vllm")
FORMAT_TENSORS = (
    "fc.weight",
    "midlayer.hidden_norm.weight",
    "midlayer.input_layernorm.weight",
    "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight",
    "midlayer.post_attention_layernorm.weight",
    "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
    "norm.weight",
    "lm_head.weight",
)


@dataclass(frozen=True)
class Eagle3TargetSpec:
    """What an EAGLE-3 draft must agree with: the target's vocabulary, width, depth, fingerprint,
    HF ``model_type``, M-RoPE split (None: 1-D RoPE) and context length."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    name: str
    model_type: str | None = None
    mrope_section: tuple[int, ...] | None = None
    max_position_embeddings: int = 4096


def target_spec(target: Any) -> Eagle3TargetSpec:
    """The spec of an mmspec target: an engine ``DecoderLM`` or a target with a converted ``decoder``
    (VLM targets: HF ``config.model_type``, M-RoPE, ``text_config.max_position_embeddings``)."""
    owner = getattr(target, "decoder", target)
    config = owner.config
    hf = getattr(target, "config", None)
    model_type = getattr(hf, "model_type", None) if hf is not config else None
    text = getattr(hf, "text_config", None)
    context = getattr(text, "max_position_embeddings", None) or 4096
    return Eagle3TargetSpec(
        vocab_size=owner.output.weight.shape[0],
        hidden_size=config.dim,
        num_layers=len(decoder_layers(target)),
        name=target_fingerprint(owner.output),
        model_type=model_type,
        mrope_section=getattr(config, "mrope_section", None),
        max_position_embeddings=int(context),
    )


def _check_convention(layer_convention: str) -> None:
    if layer_convention not in LAYER_CONVENTIONS:
        raise ValueError(f"layer_convention must be one of {LAYER_CONVENTIONS}, got {layer_convention!r}")


def write_eagle3(
    head: Eagle3Head,
    out: str | Path,
    layer_convention: str = "sglang",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``head`` in the serving format to ``out`` (created); returns ``out``.

    ``layer_convention``: ``"sglang"`` writes each aux layer id as the layer whose output is used
    (SGLang, SpecForge); ``"vllm"`` writes ``id + 1`` (vLLM's "state entering layer id").
    ``dtype``: cast floating tensors (e.g. ``torch.bfloat16`` for serving); None keeps the head's.
    """
    _check_convention(layer_convention)
    c = head.config
    ids = [i + (1 if layer_convention == "vllm" else 0) for i in c.aux_layer_ids]
    weight_dtype = dtype or head.fc.weight.dtype
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "num_hidden_layers": 1,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "vocab_size": c.vocab_size,
        "draft_vocab_size": c.draft_vocab_size,
        "target_hidden_size": c.target_hidden_size,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": str(weight_dtype).removeprefix("torch."),
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": ids, "use_aux_hidden_state": True},
        "mmspec": {
            "target_name": c.target_name,
            "target_num_layers": c.target_num_layers,
            "layer_convention": layer_convention,
        },
    }
    if c.mrope_section is not None:
        config["rope_scaling"] = {"type": "mrope", "rope_type": "default", "mrope_section": list(c.mrope_section)}
    if c.target_model_type is not None:
        config["target_model_type"] = c.target_model_type
    tensors = {}
    for name, value in head.state_dict().items():
        value = value.detach()
        if value.is_floating_point():
            value = value.to(weight_dtype)
        tensors[name] = value.contiguous().cpu()
    tensors["d2t"] = tensors["d2t"].to(torch.int64)
    tensors["t2d"] = tensors["t2d"].to(torch.bool)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def is_eagle3_dir(directory: str | Path) -> bool:
    """Whether ``directory`` holds a draft in the serving format (by its config's architecture)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return False
    return ARCHITECTURE in (read_json(path).get("architectures") or [])


def read_eagle3(
    directory: str | Path,
    spec: Eagle3TargetSpec,
    embed: nn.Embedding | None = None,
    layer_convention: str | None = None,
) -> Eagle3Head:
    """Load a draft in the serving format as an :class:`~mmspec.drafters.eagle3.Eagle3Head` for the
    target described by ``spec`` whose token embedding is ``embed`` (used when the file ships none).

    Raises:
        ValueError: not an EAGLE-3 draft, or one for another target (vocabulary, hidden size, layer
            count, target type, RoPE kind), or inconsistent tensors (shapes, ``d2t`` / ``t2d``).
    """
    directory = Path(directory)
    config_file, weights_file = directory / "config.json", directory / "model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise ValueError(f"{directory} is not an EAGLE-3 draft directory: it needs config.json and model.safetensors")
    cfg = read_json(config_file)
    if ARCHITECTURE not in (cfg.get("architectures") or []):
        raise ValueError(
            f'{directory}/config.json declares architectures {cfg.get("architectures")}, not ["{ARCHITECTURE}"]: '
            "not an EAGLE-3 draft"
        )
    if cfg.get("num_hidden_layers", 1) != 1:
        raise ValueError(f"mmspec loads one-layer EAGLE-3 drafts; {directory} has {cfg['num_hidden_layers']} layers")
    hidden = int(cfg["hidden_size"])
    target_hidden = int(cfg.get("target_hidden_size") or hidden)
    vocab = int(cfg["vocab_size"])
    draft_vocab = int(cfg.get("draft_vocab_size") or vocab)
    problems = []
    if vocab != spec.vocab_size:
        problems.append(f"vocabulary {vocab} (this target: {spec.vocab_size})")
    if target_hidden != spec.hidden_size:
        problems.append(f"target hidden size {target_hidden} (this target: {spec.hidden_size})")
    wanted_type = cfg.get("target_model_type")
    if wanted_type is not None and spec.model_type is not None and wanted_type != spec.model_type:
        problems.append(f"target type {wanted_type!r} (this target: {spec.model_type!r})")
    rope_scaling = cfg.get("rope_scaling") or {}
    mrope = rope_scaling.get("mrope_section")
    if (mrope is not None) != (spec.mrope_section is not None):
        problems.append(
            f"{'M-RoPE' if mrope is not None else '1-D RoPE'} positions (this target uses "
            f"{'M-RoPE' if spec.mrope_section is not None else '1-D RoPE'})"
        )
    recorded = cfg.get("mmspec") or {}
    if recorded.get("target_num_layers") not in (None, spec.num_layers):
        problems.append(f"a {recorded['target_num_layers']}-layer target (this target: {spec.num_layers} layers)")
    if problems:
        raise ValueError(f"the EAGLE-3 draft in {directory} was made for another target: {'; '.join(problems)}")
    convention = recorded.get("layer_convention") or layer_convention or "sglang"
    _check_convention(convention)
    eagle = cfg.get("eagle_config") or {}
    ids = eagle.get("eagle_aux_hidden_state_layer_ids")
    if ids is None:
        aux = default_aux_layers(spec.num_layers)
    else:
        aux = tuple(int(i) - (1 if convention == "vllm" else 0) for i in ids)
    heads = int(cfg["num_attention_heads"])
    tensors = read_safetensors(weights_file)
    missing = [name for name in FORMAT_TENSORS if name not in tensors]
    if missing:
        raise ValueError(f"the EAGLE-3 draft in {directory} lacks tensors {missing}")
    owns_embedding = "embed_tokens.weight" in tensors
    config = Eagle3Config(
        hidden_size=hidden,
        target_hidden_size=target_hidden,
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        intermediate_size=int(cfg["intermediate_size"]),
        vocab_size=vocab,
        draft_vocab_size=draft_vocab,
        aux_layer_ids=aux,
        target_name=spec.name,
        target_num_layers=spec.num_layers,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        mrope_section=None if mrope is None else tuple(mrope),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        shares_embedding=not owns_embedding,
        target_model_type=wanted_type,
    )
    if not owns_embedding and embed is not None and embed.weight.shape[1] != hidden:
        raise ValueError(
            f"the EAGLE-3 draft in {directory} ships no embed_tokens and its width {hidden} differs from the "
            f"target's embedding ({embed.weight.shape[1]}): it cannot share the target's embedding"
        )
    head = Eagle3Head(config, None if owns_embedding else embed)
    expected = {name: tuple(value.shape) for name, value in head.state_dict().items()}
    if "d2t" not in tensors:  # a full-vocabulary draft may ship no maps
        if draft_vocab != vocab:
            raise ValueError(
                f"the EAGLE-3 draft in {directory} has draft_vocab_size {draft_vocab} < {vocab} but no d2t map"
            )
        tensors["d2t"] = torch.zeros(draft_vocab, dtype=torch.long)
        tensors["t2d"] = torch.ones(vocab, dtype=torch.bool)
    if "t2d" not in tensors:  # vLLM does not read it; rebuild it from d2t
        tensors["t2d"] = torch.zeros(vocab, dtype=torch.bool).index_fill(
            0, (torch.arange(draft_vocab) + tensors["d2t"].long()).clamp(0, vocab - 1), True
        )
    wrong = [
        f"{name} {list(tensors[name].shape)} (expected {list(shape)})"
        for name, shape in expected.items()
        if name in tensors and tuple(tensors[name].shape) != shape
    ]
    if wrong:
        raise ValueError(f"the EAGLE-3 draft in {directory} has tensors of the wrong shape: {', '.join(wrong)}")
    d2t = tensors["d2t"].to(torch.long)
    ids_in_target = torch.arange(draft_vocab) + d2t
    if int(ids_in_target.min()) < 0 or int(ids_in_target.max()) >= vocab:
        raise ValueError(f"the EAGLE-3 draft in {directory} maps draft ids outside the target vocabulary (d2t offsets)")
    t2d = tensors["t2d"].to(torch.bool)
    if not torch.equal(t2d.nonzero().flatten(), ids_in_target.sort().values):
        raise ValueError(f"the EAGLE-3 draft in {directory} has t2d and d2t maps that disagree")
    state = {name: tensors[name] for name in expected if name not in ("d2t", "t2d")}
    head.load_state_dict({**state, "d2t": d2t, "t2d": t2d}, strict=True)
    return head.to(embed.weight.device if embed is not None else "cpu")
