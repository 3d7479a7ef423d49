"""EAGLE-3 drafters for VLM targets (LLaVA-family language models with 1-D RoPE, Qwen2-VL /
Qwen2.5-VL with M-RoPE): the engine's :class:`~mmspec.drafters.eagle3.Eagle3Drafter` with a head
sized from the target's converted language model, and loading from mmspec's own saved layout or
the vLLM / SGLang serving format (:mod:`mmspec.drafters.eagle3_format`).

Image tokens are ordinary pairs, as in the serving engines (vLLM's ``llama_eagle3.py`` embeds the
placeholder id with ``embed_tokens``; the image content reaches the head through the target's
auxiliary features ``a_t``); RoPE ids are the target's (M-RoPE ``(t, h, w)`` over the prompt, then
``position + rope_delta`` for text). The visual-compression drafters (:mod:`.drafters`) stay mmspec
runtime drafters: no engine serves them.
"""

from __future__ import annotations

import math
from pathlib import Path

from mmspec.checkpoint_io import read_json
from mmspec.drafters.eagle import TreeConfig, target_fingerprint
from mmspec.drafters.eagle3 import ARCH, ARCH_KEY, Eagle3Drafter, Eagle3Head, eagle3_config_for
from mmspec.drafters.eagle3_format import is_eagle3_dir, read_eagle3, target_spec

from .targets import VLMTarget


def rope_theta_of(target: VLMTarget) -> float:
    """The target's RoPE base from its frequencies (``inv_freq[1] = theta^(-2/D)``)."""
    inv_freq = target.decoder.inv_freq
    if inv_freq.numel() < 2:
        return 10000.0
    return float(round(inv_freq[1].double().reciprocal().pow(inv_freq.numel()).item(), 3))


def eagle3_head_for_vlm(
    target: VLMTarget,
    draft_vocab_size: int | None = None,
    aux_layer_ids: tuple[int, int, int] | None = None,
) -> Eagle3Head:
    """A fresh EAGLE-3 head as wide as ``target``'s language model (its embedding shared), with its
    RoPE base, M-RoPE split and context length."""
    c = target.decoder.config
    text = getattr(target.config, "text_config", None)
    config = eagle3_config_for(
        c.dim,
        c.n_head,
        c.n_kv_head,
        c.head_dim,
        c.hidden_dim,
        c.vocab_size,
        c.n_layer,
        target_fingerprint(target.decoder.output),
        draft_vocab_size,
        aux_layer_ids,
        rms_norm_eps=c.norm_eps,
        rope_theta=rope_theta_of(target),
        mrope_section=c.mrope_section,
        max_position_embeddings=int(getattr(text, "max_position_embeddings", None) or 4096),
        target_model_type=getattr(target.config, "model_type", None),
    )
    if not math.isfinite(config.rope_theta):
        raise ValueError("could not read the target's RoPE base")
    return Eagle3Head(config, target.decoder.tok_embeddings).to(target.device)


def load_eagle3_drafter(
    path: str | Path,
    target,
    tree: TreeConfig | None = None,
    layer_convention: str | None = None,
) -> Eagle3Drafter:
    """An EAGLE-3 drafter for ``target`` (a VLM target or an engine ``DecoderLM``) from ``path``:
    mmspec's saved layout (``mmspec train-drafter --arch eagle3``) or the serving format (e.g. trained
    by SpecForge, or written by ``mmspec export-drafter``). ``layer_convention`` reads the aux layer
    ids of a serving-format file without mmspec's record (default ``"sglang"``: layer outputs)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} holds no drafter (no config.json)")
    if read_json(config_file).get(ARCH_KEY) == ARCH:
        return Eagle3Drafter.from_pretrained(path, target, tree)
    if not is_eagle3_dir(path):
        raise ValueError(f"{path} is neither an mmspec EAGLE-3 drafter nor an EAGLE-3 draft in the vLLM/SGLang format")
    owner = getattr(target, "decoder", target)
    head = read_eagle3(path, target_spec(target), owner.tok_embeddings, layer_convention)
    return Eagle3Drafter(head.to(owner.output.weight.device).eval(), tree)
