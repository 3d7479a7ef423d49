"""Load official MAR checkpoints (LTH14/mar) and its KL-16 VAE strictly.

Checkpoint layouts accepted (facts in ``../shared/fixtures/mar/README.md``):

* the released files: ``{"model": state_dict, "model_ema": state_dict}``; the official notebook and
  ``evaluate()`` generate with ``model_ema`` — the default here (``use_ema=False`` picks ``model``);
* the trainer's ``checkpoint-last.pth`` (``util/misc.py::save_model``): also ``args``
  (an ``argparse.Namespace``), ``epoch``, ``optimizer``, ``scaler``. It is read with
  ``torch.load(weights_only=True)`` inside ``torch.serialization.safe_globals([argparse.Namespace])``:
  nothing but tensors, containers and that one class is unpickled;
* a bare state dict.

Configs: a preset (``"MAR-B"``, ``"MAR-L"``, ``"MAR-H"``: the official ``mar_base/large/huge``
factories with ``main_mar.py``'s defaults and the released heads' ``diffloss_d``/``diffloss_w``), a
dict of the official ``MAR(...)`` constructor arguments (training-only ones are accepted and
ignored), or None with a trainer checkpoint whose ``args.model`` names an official factory. Loading
is STRICT: a missing, unexpected or mis-shaped key raises a ValueError naming it (the official VAE
loader uses ``strict=False``, which silently keeps random weights).
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from .modeling_mar import MARModel
from .modeling_vae import MARAutoencoderKL

#: ``models/mar.py::mar_base/large/huge`` widths, depths and heads; ``main_mar.py`` defaults;
#: the released checkpoints' diffusion heads (MAR paper Table 2 / README: 6x1024, 8x1280, 12x1536).
_MAR_COMMON = {
    "img_size": 256,
    "vae_stride": 16,
    "patch_size": 1,
    "mlp_ratio": 4.0,
    "vae_embed_dim": 16,
    "class_num": 1000,
    "buffer_size": 64,
    "num_sampling_steps": "100",
}
MAR_PRESETS: dict[str, dict[str, Any]] = {
    "MAR-B": {
        **_MAR_COMMON,
        "encoder_embed_dim": 768,
        "encoder_depth": 12,
        "encoder_num_heads": 12,
        "decoder_embed_dim": 768,
        "decoder_depth": 12,
        "decoder_num_heads": 12,
        "diffloss_d": 6,
        "diffloss_w": 1024,
    },
    "MAR-L": {
        **_MAR_COMMON,
        "encoder_embed_dim": 1024,
        "encoder_depth": 16,
        "encoder_num_heads": 16,
        "decoder_embed_dim": 1024,
        "decoder_depth": 16,
        "decoder_num_heads": 16,
        "diffloss_d": 8,
        "diffloss_w": 1280,
    },
    "MAR-H": {
        **_MAR_COMMON,
        "encoder_embed_dim": 1280,
        "encoder_depth": 20,
        "encoder_num_heads": 16,
        "decoder_embed_dim": 1280,
        "decoder_depth": 20,
        "decoder_num_heads": 16,
        "diffloss_d": 12,
        "diffloss_w": 1536,
    },
}
#: official factory names (``args.model`` of a trainer checkpoint) -> preset
OFFICIAL_MODEL_NAMES = {"mar_base": "MAR-B", "mar_large": "MAR-L", "mar_huge": "MAR-H"}
#: ``MAR(...)`` arguments (and ``main_mar.py`` args) that only matter for training or are fixed here
MAR_IGNORED_ARGS = frozenset(
    {
        "mask_ratio_min",
        "label_drop_prob",
        "attn_dropout",
        "proj_dropout",
        "diffusion_batch_mul",
        "grad_checkpointing",
        "norm_layer",
    }
)
#: the released KL-16 (``AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))``, ch 128)
VAE_PRESETS: dict[str, dict[str, Any]] = {"KL-16": {"embed_dim": 16, "ch": 128, "ch_mult": (1, 1, 2, 2, 4)}}
_MAX_LISTED = 6


def read_official_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint at ``path`` as a dict, read with ``weights_only=True`` (``argparse.Namespace``
    allow-listed for the trainer's ``args``).

    Raises:
        FileNotFoundError: nothing exists at ``path`` (or it is a folder).
        ValueError: the file is not a checkpoint dict readable with ``weights_only=True``.
    """
    if not os.path.isfile(path):
        what = "is a folder, not a checkpoint file" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(f"MAR checkpoint {os.fspath(path)} {what}")
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - re-raised with the path and what is accepted
            raise ValueError(
                f"cannot read {path} as a MAR checkpoint with weights_only=True (only tensors, containers "
                f"and argparse.Namespace are allowed): {err}"
            ) from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return dict(obj)


def select_state_dict(
    checkpoint: Mapping[str, Any], use_ema: bool = True, path: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """The model weights of an official checkpoint: ``model_ema`` (default) or ``model``; a bare state
    dict as it is."""
    if "model" in checkpoint or "model_ema" in checkpoint:
        key = "model_ema" if use_ema else "model"
        if key not in checkpoint:
            raise ValueError(
                f"{path} has no {key!r} entry (keys: {sorted(checkpoint)}); "
                f"pass use_ema={not use_ema} to load {'model' if use_ema else 'model_ema'}"
            )
        state = checkpoint[key]
    else:
        state = checkpoint
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: not a state dict (non-tensor entries {bad[:_MAX_LISTED]})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def resolve_mar_config(config: str | Mapping[str, Any] | None, args: Any = None, **overrides: Any) -> dict[str, Any]:
    """A ``MARModel`` config from a preset name, a dict of official constructor arguments, or (config
    None) a trainer checkpoint's ``args`` whose ``model`` names an official factory."""
    if config is None:
        if args is None:
            raise ValueError(
                "pass mar_config: a preset (" + ", ".join(MAR_PRESETS) + ") or a dict of the official "
                "MAR(...) arguments (the checkpoint has no `args` to read it from)"
            )
        name = getattr(args, "model", None)
        if name not in OFFICIAL_MODEL_NAMES:
            raise ValueError(
                f"the checkpoint's args.model is {name!r}, not an official factory "
                f"({', '.join(OFFICIAL_MODEL_NAMES)}): pass mar_config (a preset or a dict)"
            )
        fields = dict(MAR_PRESETS[OFFICIAL_MODEL_NAMES[name]])
        for key in fields:
            if key not in (
                "encoder_embed_dim",
                "encoder_depth",
                "encoder_num_heads",
                "decoder_embed_dim",
                "decoder_depth",
                "decoder_num_heads",
                "mlp_ratio",
            ) and hasattr(args, key):
                fields[key] = getattr(args, key)
    elif isinstance(config, str):
        if config not in MAR_PRESETS:
            raise ValueError(f"unknown MAR preset {config!r}; presets: {', '.join(MAR_PRESETS)} (or pass a dict)")
        fields = dict(MAR_PRESETS[config])
    elif isinstance(config, Mapping):
        fields = {**_MAR_COMMON, **{k: v for k, v in config.items() if k not in MAR_IGNORED_ARGS}}
    else:
        raise TypeError(f"mar_config must be a preset name, a dict or None, got {type(config).__name__}")
    fields.update(overrides)
    known = list(inspect.signature(MARModel.__init__).parameters)[1:]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(
            f"unknown MAR config field(s) {unknown}; known: {known} "
            f"(training-only, ignored: {sorted(MAR_IGNORED_ARGS)})"
        )
    fields["num_sampling_steps"] = str(fields["num_sampling_steps"])
    return fields


def infer_vae_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """VAE widths from the state-dict shapes: ``ch`` (``encoder.conv_in.weight``), ``ch_mult`` (each
    level's last block), ``embed_dim``, ``num_res_blocks`` and the attention levels."""
    try:
        ch = state_dict["encoder.conv_in.weight"].shape[0]
        embed_dim = state_dict["post_quant_conv.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"not a MAR KL VAE state dict: missing {err}") from err
    levels = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    blocks = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    ch_mult = tuple(state_dict[f"encoder.down.{i}.block.{blocks[-1]}.conv2.weight"].shape[0] // ch for i in levels)
    attn = [i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in state_dict]
    resolution = 256  # the official constructor's; attention levels are set relative to it
    return {
        "embed_dim": embed_dim,
        "ch": ch,
        "ch_mult": ch_mult,
        "num_res_blocks": len(blocks),
        "attn_resolutions": tuple(resolution // 2**i for i in attn),
        "resolution": resolution,
        "use_variational": state_dict["quant_conv.weight"].shape[0] == 2 * embed_dim,
    }


def load_official_mar(
    path: str | os.PathLike, config: str | Mapping[str, Any] | None = None, use_ema: bool = True, **overrides: Any
) -> MARModel:
    """A :class:`MARModel` from an official checkpoint (EMA weights by default), loaded strictly."""
    checkpoint = read_official_checkpoint(path)
    state = select_state_dict(checkpoint, use_ema, str(path))
    fields = resolve_mar_config(config, checkpoint.get("args"), **overrides)
    model = MARModel(**fields)
    _load_strict(model, state, str(path), f"MAR config {fields}")
    return model.eval()


def load_official_vae(path: str | os.PathLike, config: str | Mapping[str, Any] | None = None) -> MARAutoencoderKL:
    """A :class:`MARAutoencoderKL` from an official VAE checkpoint (``{"model": state_dict}``, e.g.
    ``kl16.ckpt``), loaded strictly; widths read from the shapes unless ``config`` (a preset or dict)
    is given."""
    state = select_state_dict(read_official_checkpoint(path), use_ema=False, path=str(path))
    if config is None:
        fields = infer_vae_config(state)
    elif isinstance(config, str):
        if config not in VAE_PRESETS:
            raise ValueError(
                f"unknown VAE preset {config!r}; presets: {', '.join(VAE_PRESETS)} (or pass a dict / None)"
            )
        fields = dict(VAE_PRESETS[config])
    else:
        fields = dict(config)
    model = MARAutoencoderKL(**fields)
    _load_strict(model, state, str(path), f"VAE config {fields}")
    return model.eval()


def _load_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: str, what: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) {missing[:_MAX_LISTED]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) {unexpected[:_MAX_LISTED]}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es) {shapes[:_MAX_LISTED]}")
        raise ValueError(f"{path} does not fit the {what}: " + "; ".join(parts))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
