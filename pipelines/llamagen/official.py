"""Load official LlamaGen checkpoints (FoundationVision/LlamaGen ``.pt`` files) strictly.

The official sample scripts build ``GPT_models[name](vocab_size=..., block_size=..., ...)`` and
``VQ_models[name](codebook_size=..., codebook_embed_dim=...)``, then read ``checkpoint["model"]``
(DDP), ``["module"]`` (DeepSpeed) or ``["state_dict"]``, or a raw state dict (FSDP). The same
presets and containers are accepted here, but loading is STRICT: a checkpoint that does not fit the
requested configuration raises a :class:`ValueError` naming the offending keys and shapes and what
the weights look like (the official scripts load with ``strict=False``, which silently keeps
random weights).

What the weights cannot tell: ``n_head`` (only ``dim`` is stored) and ``block_size`` / image size
(the 2-D RoPE table is recomputed, not stored). Pass ``image_size=384`` (or ``block_size=576``) for
the ``*_384`` checkpoints; the default is the official ``ModelArgs`` default, 256 tokens (256 px
with the 16x VQ).
"""

from __future__ import annotations

import argparse
import inspect
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import torch

from .modeling_gpt import LlamaGenGPT
from .modeling_vq import LlamaGenVQ

# ``GPT_models`` of autoregressive/models/gpt.py: (dim, n_layer, n_head).
GPT_PRESETS: dict[str, dict[str, int]] = {
    "GPT-B": {"dim": 768, "n_layer": 12, "n_head": 12},
    "GPT-L": {"dim": 1024, "n_layer": 24, "n_head": 16},
    "GPT-XL": {"dim": 1280, "n_layer": 36, "n_head": 20},
    "GPT-XXL": {"dim": 1536, "n_layer": 48, "n_head": 24},
    "GPT-XXXL": {"dim": 2560, "n_layer": 48, "n_head": 40},
    "GPT-1B": {"dim": 2048, "n_layer": 22, "n_head": 32},
    "GPT-3B": {"dim": 3200, "n_layer": 24, "n_head": 32},
    "GPT-7B": {"dim": 4096, "n_layer": 32, "n_head": 32},
}

# ``VQ_models`` of tokenizer/tokenizer_image/vq_model.py.
VQ_PRESETS: dict[str, dict[str, list[int]]] = {
    "VQ-16": {"encoder_ch_mult": [1, 1, 2, 2, 4], "decoder_ch_mult": [1, 1, 2, 2, 4]},
    "VQ-8": {"encoder_ch_mult": [1, 2, 2, 4], "decoder_ch_mult": [1, 2, 2, 4]},
}


def _init_defaults(cls: type) -> dict[str, Any]:
    """Constructor defaults of a model class (its config fields), read from the signature."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # drop self
    return {param.name: param.default for param in params}


# The GPT config fields with the official ``ModelArgs`` defaults (LlamaGenGPT mirrors them).
GPT_MODEL_ARGS: dict[str, Any] = _init_defaults(LlamaGenGPT)
# ``ModelArgs`` fields that only matter for training or the official KV cache: accepted, ignored.
GPT_IGNORED_ARGS = frozenset(
    {
        "token_dropout_p",
        "attn_dropout_p",
        "resid_dropout_p",
        "ffn_dropout_p",
        "drop_path_rate",
        "max_batch_size",
        "max_seq_len",
    }
)
# Sample-script arguments that set ``block_size = (image_size // downsample_size) ** 2``.
GPT_IMAGE_ARGS = frozenset({"image_size", "downsample_size"})
# Official t2i sample-script default: 120 T5 caption positions.
T2I_CLS_TOKEN_NUM = 120

# Official VQ ``ModelArgs`` defaults (``dropout_p`` is called ``dropout``), plus the
# constructor-only ``ch`` / ``num_res_blocks`` that ``VQModel`` never changes.
VQ_MODEL_ARGS: dict[str, Any] = _init_defaults(LlamaGenVQ)
VQ_IGNORED_ARGS = frozenset({"commit_loss_beta", "entropy_loss_ratio"})

_CONTAINER_KEYS = ("model", "module", "state_dict", "ema")  # official scripts' order, then EMA
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
_RUNTIME_KEY = re.compile(r"(^|\.)(freqs_cis|causal_mask|kv_cache\.[kv]_cache)$")
_MAX_LISTED = 6


# ---------------------------------------------------------------------------------- configs
def resolve_gpt_config(config: str | Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """``LlamaGenGPT`` keyword arguments from a preset name or official ``ModelArgs`` fields.

    Args:
        config: a :data:`GPT_PRESETS` name (official sample-script defaults for the rest:
            ``vocab_size`` 16384, ``num_classes`` 1000, ``cls_token_num`` 1 for c2i / 120 for t2i,
            ``block_size`` 256) or a dict of official ``ModelArgs`` fields (missing ones take the
            ``ModelArgs`` defaults; dropout / ``max_*`` fields are ignored).
        **overrides: more ``ModelArgs`` fields, or ``image_size`` / ``downsample_size`` (default 16)
            which set ``block_size = (image_size // downsample_size) ** 2``.

    Raises:
        ValueError: unknown preset or field.
    """
    if isinstance(config, str):
        if config not in GPT_PRESETS:
            raise ValueError(f"unknown LlamaGen GPT preset {config!r}; choose one of {sorted(GPT_PRESETS)}")
        fields = {**GPT_PRESETS[config], **overrides}
        if fields.get("model_type") == "t2i":
            fields.setdefault("cls_token_num", T2I_CLS_TOKEN_NUM)
    else:
        fields = {**config, **overrides}
    unknown = sorted(fields.keys() - GPT_MODEL_ARGS.keys() - GPT_IGNORED_ARGS - GPT_IMAGE_ARGS)
    if unknown:
        raise ValueError(
            f"unknown LlamaGen GPT config field(s) {unknown}; known: {sorted(GPT_MODEL_ARGS)} "
            f"(ignored: {sorted(GPT_IGNORED_ARGS)}; image_size/downsample_size set block_size)"
        )
    if "image_size" in fields:
        if "block_size" in fields:
            raise ValueError("give either image_size (+ downsample_size) or block_size, not both")
        fields["block_size"] = (fields["image_size"] // fields.get("downsample_size", 16)) ** 2
    return {key: fields.get(key, default) for key, default in GPT_MODEL_ARGS.items()}


def resolve_vq_config(config: str | Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """``LlamaGenVQ`` keyword arguments from a preset name (``"VQ-16"``, ``"VQ-8"``) or official VQ
    ``ModelArgs`` fields (``dropout_p`` or ``dropout``; ``ch`` and ``num_res_blocks`` accepted;
    loss weights ignored), plus ``overrides``. Raises ValueError for unknown presets or fields."""
    if isinstance(config, str):
        if config not in VQ_PRESETS:
            raise ValueError(f"unknown LlamaGen VQ preset {config!r}; choose one of {sorted(VQ_PRESETS)}")
        fields = {**VQ_PRESETS[config], **overrides}
    else:
        fields = {**config, **overrides}
    if "dropout_p" in fields:
        fields["dropout"] = fields.pop("dropout_p")
    unknown = sorted(fields.keys() - VQ_MODEL_ARGS.keys() - VQ_IGNORED_ARGS)
    if unknown:
        raise ValueError(
            f"unknown LlamaGen VQ config field(s) {unknown}; known: {sorted(VQ_MODEL_ARGS)} + dropout_p "
            f"(ignored: {sorted(VQ_IGNORED_ARGS)})"
        )
    return {key: fields.get(key, default) for key, default in VQ_MODEL_ARGS.items()}


# ---------------------------------------------------------------------------------- reading
def read_official_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a LlamaGen ``.pt`` file into a clean state dict.

    Accepts ``{"model": sd}`` (DDP), ``{"module": sd}`` (DeepSpeed), ``{"state_dict": sd}``,
    ``{"ema": sd}`` and raw state dicts (FSDP); strips ``module.`` / ``_orig_mod.`` prefixes and
    FSDP wrapper segments; drops runtime entries (``freqs_cis``, ``causal_mask``, KV caches).
    Loads with ``weights_only=True`` (no arbitrary code from the file; ``argparse.Namespace``, which
    official training checkpoints carry under ``"args"``, is allowed).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a torch checkpoint, or holds no tensor state dict.
    """
    with open(path, "rb") as handle:
        magic = handle.read(2)
    # torch.save writes a zip archive ("PK"); legacy torch files are pickles (protocol byte 0x80).
    if magic != b"PK" and not magic.startswith(b"\x80"):
        raise ValueError(
            f"{os.fspath(path)!r} is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle); "
            "expected an official LlamaGen .pt file"
        )
    try:
        # Official training checkpoints also store the argparse ``args`` next to the weights.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{os.fspath(path)!r} could not be read as a weights-only PyTorch checkpoint: {err}") from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"{os.fspath(path)!r} holds a {type(obj).__name__}, not a state dict or a checkpoint dict")
    for key in _CONTAINER_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    tensors = {key: value for key, value in obj.items() if isinstance(value, torch.Tensor)}
    if not tensors or len(tensors) != len(obj):
        raise ValueError(
            f"{os.fspath(path)!r} is not a LlamaGen checkpoint: expected a state dict of tensors, raw or "
            f"under one of {list(_CONTAINER_KEYS)}; top-level keys: {_first(list(obj))}"
        )
    state_dict = {}
    for key, value in tensors.items():
        for segment in _WRAPPER_SEGMENTS:
            key = key.replace(segment, "")
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        if not _RUNTIME_KEY.search(key):
            state_dict[key] = value
    return state_dict


# ---------------------------------------------------------------------------------- inference
def infer_gpt_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The ``ModelArgs`` fields a GPT state dict determines (for error messages and sanity checks).

    Returns ``dim``, ``vocab_size``, ``n_layer``, ``model_type`` and ``num_classes`` (c2i, assuming
    the null-class row exists) or ``caption_dim`` (t2i); ``n_kv_head: None`` when ``wqkv`` is
    ``3 * dim`` wide. ``n_head`` and ``block_size`` are not stored in the weights.

    Raises:
        ValueError: not a LlamaGen GPT state dict.
    """
    if "tok_embeddings.weight" not in state_dict:
        kind = (
            "a LlamaGen VQ tokenizer (use load_official_vq)"
            if "quantize.embedding.weight" in state_dict
            else "not a LlamaGen GPT"
        )
        raise ValueError(
            f"this state dict is {kind}: no 'tok_embeddings.weight'; first keys: {_first(list(state_dict))}"
        )
    vocab_size, dim = state_dict["tok_embeddings.weight"].shape
    layers = {int(m.group(1)) for key in state_dict if (m := re.match(r"layers\.(\d+)\.", key))}
    inferred: dict[str, Any] = {"dim": dim, "vocab_size": vocab_size, "n_layer": len(layers)}
    wqkv = state_dict.get("layers.0.attention.wqkv.weight")
    if wqkv is not None and wqkv.shape[0] == 3 * dim:
        inferred["n_kv_head"] = None
    if "cls_embedding.cap_proj.fc1.weight" in state_dict:
        inferred.update(model_type="t2i", caption_dim=state_dict["cls_embedding.cap_proj.fc1.weight"].shape[1])
    elif "cls_embedding.embedding_table.weight" in state_dict:
        inferred.update(model_type="c2i", num_classes=state_dict["cls_embedding.embedding_table.weight"].shape[0] - 1)
    return inferred


def infer_vq_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The ``LlamaGenVQ`` fields a VQ state dict determines: codebook size/width, ``z_channels``,
    ``ch``, both ``ch_mult`` lists, ``num_res_blocks`` and ``codebook_show_usage``.

    Raises:
        ValueError: not a LlamaGen VQ state dict.
    """
    needed = ("quantize.embedding.weight", "quant_conv.weight", "encoder.conv_in.weight")
    if any(key not in state_dict for key in needed):
        kind = (
            "a LlamaGen GPT (use load_official_gpt)"
            if "tok_embeddings.weight" in state_dict
            else "not a LlamaGen VQ tokenizer"
        )
        raise ValueError(f"this state dict is {kind}: it lacks {list(needed)}; first keys: {_first(list(state_dict))}")
    codebook_size, embed_dim = state_dict["quantize.embedding.weight"].shape
    ch = state_dict["encoder.conv_in.weight"].shape[0]

    def widths(part: str) -> list[int]:
        out, level = [], 0
        while f"{part}.conv_blocks.{level}.res.0.conv1.weight" in state_dict:
            out.append(state_dict[f"{part}.conv_blocks.{level}.res.0.conv1.weight"].shape[0] // ch)
            level += 1
        return out

    num_res_blocks = len({k.split(".")[4] for k in state_dict if k.startswith("encoder.conv_blocks.0.res.")})
    return {
        "codebook_size": codebook_size,
        "codebook_embed_dim": embed_dim,
        "z_channels": state_dict["quant_conv.weight"].shape[1],
        "ch": ch,
        "encoder_ch_mult": widths("encoder"),
        "decoder_ch_mult": widths("decoder")[::-1],
        "num_res_blocks": num_res_blocks,
        "codebook_show_usage": "quantize.codebook_used" in state_dict,
    }


# ---------------------------------------------------------------------------------- loading
def load_official_gpt(
    path: str | os.PathLike, config: str | Mapping[str, Any], dtype: torch.dtype | None = None, **overrides: Any
) -> LlamaGenGPT:
    """Build a :class:`LlamaGenGPT` from ``config`` (see :func:`resolve_gpt_config`) and load an
    official checkpoint into it strictly; returned in eval mode (cast to ``dtype`` if given).

    Example: ``load_official_gpt("c2i_XL_384.pt", "GPT-XL", image_size=384)``.

    Raises:
        ValueError: unreadable file, not a LlamaGen GPT, or any missing / unexpected key or shape
            mismatch (the message lists them and the sizes the checkpoint implies).
    """
    kwargs = resolve_gpt_config(config, **overrides)
    state_dict = read_official_state_dict(path)
    inferred = infer_gpt_config(state_dict)
    with torch.device("meta"):  # no random init of weights that are overwritten anyway
        model = LlamaGenGPT(**kwargs)
    _load_strict(model, state_dict, path, _describe(config, overrides), _gpt_hint(inferred))
    return model.eval() if dtype is None else model.to(dtype).eval()


def load_official_vq(
    path: str | os.PathLike, config: str | Mapping[str, Any], dtype: torch.dtype | None = None, **overrides: Any
) -> LlamaGenVQ:
    """Build a :class:`LlamaGenVQ` from ``config`` (see :func:`resolve_vq_config`) and load an
    official tokenizer checkpoint strictly; returned in eval mode (cast to ``dtype`` if given).

    Example: ``load_official_vq("vq_ds16_c2i.pt", "VQ-16")``.

    Raises:
        ValueError: unreadable file, not a LlamaGen VQ, or any key / shape mismatch.
    """
    kwargs = resolve_vq_config(config, **overrides)
    state_dict = read_official_state_dict(path)
    inferred = infer_vq_config(state_dict)
    with torch.device("meta"):
        model = LlamaGenVQ(**kwargs)
    hint = "The checkpoint's shapes say " + _fields(inferred) + "; pass these as overrides or as the config dict"
    _load_strict(model, state_dict, path, _describe(config, overrides), hint)
    return model.eval() if dtype is None else model.to(dtype).eval()


def _load_strict(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: str | os.PathLike, described: str, hint: str
) -> None:
    """``load_state_dict(strict=True, assign=True)`` after a check that reports every problem at once."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key}: checkpoint {list(state_dict[key].shape)} vs config {list(shape)}"
        for key, shape in expected.items()
        if key in state_dict and tuple(state_dict[key].shape) != shape
    ]
    problems = [
        f"{label} ({len(items)}): {_first(items)}"
        for label, items in (
            ("shape mismatch", mismatched),
            ("missing from checkpoint", missing),
            ("unexpected in checkpoint", unexpected),
        )
        if items
    ]
    if problems:
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} does not fit {type(model).__name__} built from {described}:\n  "
            + "\n  ".join(problems)
            + f"\n{hint}."
        )
    model.load_state_dict(state_dict, strict=True, assign=True)


def _gpt_hint(inferred: dict[str, Any]) -> str:
    presets = [
        name for name, p in GPT_PRESETS.items() if (p["dim"], p["n_layer"]) == (inferred["dim"], inferred["n_layer"])
    ]
    suggestion = f"preset {presets[0]!r} with overrides" if presets else "a config dict with n_head"
    return (
        f"The checkpoint's shapes say {_fields(inferred)}; pass {suggestion} matching them "
        f"(n_head and block_size/image_size cannot be read from the weights)"
    )


def _describe(config: str | Mapping[str, Any], overrides: Mapping[str, Any]) -> str:
    base = f"preset {config!r}" if isinstance(config, str) else f"config dict {_fields(dict(config))}"
    return base + (f" with overrides {_fields(dict(overrides))}" if overrides else "")


def _fields(fields: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in fields.items())


def _first(items: list[Any]) -> str:
    shown = ", ".join(str(item) for item in items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")
