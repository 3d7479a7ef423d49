"""``mmspec export-drafter DIR --format eagle3 --out OUT``: write a trained mmspec EAGLE-3 drafter in
the on-disk format vLLM and SGLang load (:mod:`mmspec.drafters.eagle3_format`).

Only EAGLE-3 heads export. mmspec's other drafters cannot be served by those engines: the EAGLE-1/2
style heads (text-only and the vision-aware ones: pool / prune / ViSpec / FLASH / SpecVLM) regress
the target's last feature and use the target's LM head, with visual compression the engines do not
implement; draft models, n-gram and Jacobi drafting have their own engine options or none.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from ..checkpoint_io import read_json, read_safetensors
from ..drafters.eagle import CONFIG_NAME, WEIGHTS_NAME
from ..drafters.eagle3 import ARCH, ARCH_KEY, Eagle3Config, Eagle3Head
from ..drafters.eagle3_format import LAYER_CONVENTIONS, write_eagle3
from ..weights_check import load_checked

FORMATS = ("eagle3",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "drafter", type=Path, help="a drafter saved by mmspec (mmspec train-drafter --arch eagle3 --output DIR)"
    )
    p.add_argument("--format", default="eagle3", choices=FORMATS, help="eagle3: vLLM / SGLang LlamaForCausalLMEagle3")
    p.add_argument("--out", type=Path, required=True, help="directory to write (config.json + model.safetensors)")
    p.add_argument(
        "--layer-convention",
        default="sglang",
        choices=LAYER_CONVENTIONS,
        help="how the aux layer ids are written: sglang = output of layer k (SGLang, SpecForge); "
        "vllm = state entering layer k (k + 1 of the former)",
    )
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="cast the weights (default: as trained)")


def load_saved_head(directory: Path) -> Eagle3Head:
    """The head saved in ``directory`` without its target: the shared token embedding is not part of
    the exported file (engines share the target's), so a shape-only stand-in takes its place."""
    config_file = directory / CONFIG_NAME
    if not config_file.is_file():
        raise SystemExit(
            f"error: {directory}: no {CONFIG_NAME}; pass a drafter directory written by mmspec train-drafter"
        )
    saved = read_json(config_file)
    if saved.get(ARCH_KEY) != ARCH:
        kind = "an EAGLE-1/2 feature head" + (
            f" (visual path {saved['visual_path']!r})" if "visual_path" in saved else ""
        )
        raise SystemExit(
            f"error: {directory} holds {kind}, which vLLM and SGLang cannot serve (it regresses the target's last feature "
            "through the target's LM head and, for VLMs, compresses image tokens in ways the engines do not "
            "implement); only EAGLE-3 heads export: train one with mmspec train-drafter --arch eagle3"
        )
    config = Eagle3Config.from_dict(saved)
    stand_in = nn.Embedding(config.vocab_size, config.hidden_size, device="meta") if config.shares_embedding else None
    head = Eagle3Head(config, stand_in)
    weights = read_safetensors(directory / WEIGHTS_NAME)
    load_checked(head, weights, "the EAGLE-3 head", str(directory))
    return head


def export_drafter_command(args: argparse.Namespace) -> int:
    """``mmspec export-drafter``: read the drafter folder, write it in ``--format``; returns 0."""
    from ..training.settings import check_folder

    check_folder(args, "drafter", "drafter folder", positional=True)
    try:  # damaged files, or weights that do not match the saved config: named, not a traceback
        head = load_saved_head(args.drafter)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {args.drafter}: {err}") from None
    out = write_eagle3(head, args.out, args.layer_convention, DTYPES.get(args.dtype) if args.dtype else None)
    c = head.config
    print(
        f"wrote {out} ({args.format}: hidden {c.hidden_size}, draft vocabulary {c.draft_vocab_size} of "
        f"{c.vocab_size}, aux layers {list(c.aux_layer_ids)} as layer outputs, written in the "
        f"{args.layer_convention} convention)"
    )
    return 0
