"""Recipes for mmspec's small reference models: a LlamaGen VQ tokenizer, a class-conditional
LlamaGen GPT (the target) and a smaller GPT (the drafter), trained on the offline emoji dataset
(:mod:`mmspec.data`) so that the embedded default model runs out of the box on a CPU.

Stages (``mmspec train-reference --stage vq|gpt|draft|low-res-draft|upsampler|all --out DIR``;
the MAR pair's ``mar-vae|mar-target|mar-draft|mar`` are in :mod:`mmspec.training.reference_mar`):

1. :func:`train_vq` — LlamaGen's VQ architecture (Sun et al. 2024, arXiv 2406.06525) trained with
   the VQ-VAE objective (van den Oord et al. 2017, arXiv 1711.00937): pixel reconstruction loss,
   codebook loss ``||sg[z] - e||²``, commitment loss ``β ||z - sg[e]||²`` (β = 0.25) and the
   straight-through gradient, on LlamaGen's L2-normalised (cosine) codebook. Codes that went unused
   since the last check are re-initialised from random encoder outputs (the dead-code restart of
   Dhariwal et al. 2020, Jukebox, and Zeghidour et al. 2021, SoundStream), and the whole codebook
   starts from encoder outputs. LlamaGen's perceptual (LPIPS) and GAN losses are left out: their
   pretrained networks are not available offline.
2. :func:`train_c2i_gpt` — the images are tokenised once with the trained VQ; the GPT is trained
   with teacher-forced next-token cross-entropy and LlamaGen's class dropout (the dropped label is
   the null class, which classifier-free guidance uses at sampling time), AdamW, linear warm-up
   then cosine decay, gradient clipping. The drafter is the same recipe with a smaller
   :meth:`GPTTrainConfig.draft` configuration.
3. The low-resolution drafter of MuLo-SD (:meth:`GPTTrainConfig.low_res_draft`): the drafter's
   recipe on the same scenes rendered at half the side, tokenised by the same VQ, so it drafts a
   grid of half the side in the target's codebook (``speculative="mulo"`` up-samples it).
4. MuLo-SD's learned up-sampler (:func:`train_upsampler`): a
   :class:`~mmspec.pipelines.llamagen.LlamaGenTokenUpsampler` trained with cross-entropy to predict
   each scene's tokens at the full resolution from the same scene's tokens at half the side.

Every stage shows a tqdm bar, writes checkpoints (model, optimiser, scheduler, step, RNG states)
every ``checkpoint_every`` steps and at the end, and continues from the latest one with
``resume=True``; with the same seed on the same device a run is bit-for-bit reproducible, resumed
or not. :func:`evaluate_reference` measures what the model card reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..pipelines.llamagen import LlamaGenGPT, LlamaGenTokenUpsampler, LlamaGenVQ
from ..pipelines.llamagen.pipeline_llamagen import LlamaGenPipeline
from .loop import add_recipe_run_args
from .reference_data import EmojiDataConfig
from .reference_eval import evaluate_reference
from .reference_gpt import GPTTrainConfig, train_c2i_gpt
from .reference_mar import MAR_STAGES, train_mar_reference_stages
from .reference_upsampler import (
    UpsamplerTrainConfig,
    cached_tokens,
    train_upsampler,
    upsampler_pairs,
)
from .reference_vq import VQTrainConfig, train_vq
from .saved import CLASSES_FILE
from .settings import check_train_reference_settings

#: File next to a saved pipeline recording the recipe (data and training configurations).
RECIPE_FILE = "recipe.json"
STAGES = ("vq", "gpt", "draft", "low-res-draft", "upsampler")
#: The :class:`LlamaGenPipeline` component each GPT stage trains.
STAGE_COMPONENTS = {"gpt": "target", "draft": "drafter", "low-res-draft": "low_res_drafter"}


# ---------------------------------------------------------------------------------------- pipeline
def save_reference_pipeline(
    vq: LlamaGenVQ,
    target: LlamaGenGPT,
    drafter: LlamaGenGPT | None,
    data: EmojiDataConfig,
    out: str | Path,
    recipe: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    low_res_drafter: LlamaGenGPT | None = None,
    upsampler: LlamaGenTokenUpsampler | None = None,
) -> LlamaGenPipeline:
    """Assemble a :class:`LlamaGenPipeline` and ``save_pretrained`` it to ``out`` with the class
    list (:data:`CLASSES_FILE`) and, if given, the recipe (:data:`RECIPE_FILE`).

    Args:
        low_res_drafter, upsampler: MuLo-SD's drafter over a smaller grid and its learned
            up-sampler (optional).
        dtype: storage dtype of the weights (float16 halves the folder; load with
            ``torch_dtype=torch.float32``). The returned pipeline is float32 and holds the weights
            as stored (rounded through ``dtype``), so evaluating it measures the saved model.
    """
    pipe = LlamaGenPipeline(target=target, vq=vq, drafter=drafter, low_res_drafter=low_res_drafter, upsampler=upsampler)
    out = Path(out)
    models = [m for m in (target, vq, drafter, low_res_drafter, upsampler) if m is not None]
    # torch's Module.to, not ModelMixin.to: the latter warns about modules to keep in float32,
    # which these models do not have.
    for model in models:
        torch.nn.Module.to(model, dtype)
    try:
        pipe.save_pretrained(out)
    finally:
        for model in models:
            torch.nn.Module.to(model, torch.float32)
    glyphs = data.dataset(heldout=True).glyphs
    classes = [{"label": i, "char": g.char, "name": g.name} for i, g in enumerate(glyphs)]
    (out / CLASSES_FILE).write_text(json.dumps(classes, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if recipe is not None:
        (out / RECIPE_FILE).write_text(json.dumps(recipe, indent=1) + "\n")
    return pipe


# ---------------------------------------------------------------------------------------- CLI
def reference_configs(preset: str, seed: int = 0) -> dict[str, VQTrainConfig | GPTTrainConfig | UpsamplerTrainConfig]:
    """The configuration of each stage (:data:`STAGES`) of a preset: ``"reference"`` (the embedded
    default) or ``"tiny"`` (seconds on a CPU; for tests and smoke runs)."""
    if preset == "reference":
        data = EmojiDataConfig(seed=seed)
        return {
            "vq": VQTrainConfig(data=data, seed=seed),
            "gpt": GPTTrainConfig(data=data, seed=seed),
            "draft": GPTTrainConfig.draft(data=data, seed=seed + 1),
            "low-res-draft": GPTTrainConfig.low_res_draft(data),
            "upsampler": UpsamplerTrainConfig(data=data),
        }
    if preset == "tiny":
        data = EmojiDataConfig(image_size=16, num_classes=4, num_samples=64, heldout_samples=8, seed=seed)
        small = {
            "steps": 4,
            "batch_size": 8,
            "dim": 16,
            "n_layer": 1,
            "n_head": 2,
            "warmup_steps": 1,
            "checkpoint_every": 2,
        }
        return {
            "vq": VQTrainConfig(
                data=data,
                seed=seed,
                steps=4,
                batch_size=8,
                codebook_size=32,
                ch_mult=(1, 2),
                z_channels=32,
                restart_every=2,
                warmup_steps=1,
                checkpoint_every=2,
            ),
            "gpt": GPTTrainConfig(data=data, seed=seed, **{**small, "dim": 32}),
            "draft": GPTTrainConfig.draft(data=data, seed=seed + 1, **small),
            "low-res-draft": GPTTrainConfig.low_res_draft(data, **small),
            "upsampler": UpsamplerTrainConfig(
                data=data, dim=32, steps=4, batch_size=8, warmup_steps=1, checkpoint_every=2
            ),
        }
    raise ValueError(f"unknown preset {preset!r}: 'reference' or 'tiny'")


def add_train_reference_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mmspec train-reference``."""
    parser.add_argument(
        "--stage",
        choices=(*STAGES, "all", *MAR_STAGES, "mar"),
        default="all",
        help="vq, then gpt (target), draft (drafter), low-res-draft (MuLo-SD's drafter at half the "
        "image side) and upsampler (MuLo-SD's learned up-sampler), which need OUT/vq; all = the five "
        "in order. The MAR pair: mar-vae, then mar-target and mar-draft (need OUT/mar-vae); mar = "
        "the three in order",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output folder: OUT/<stage> (save_pretrained), OUT/checkpoints/<stage>, "
        "and OUT/pipeline + OUT/eval.json once all five exist",
    )
    parser.add_argument(
        "--preset",
        choices=("reference", "tiny"),
        default="reference",
        help="reference = the embedded default's recipe; tiny = a seconds-long smoke run",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vq-steps", type=int, default=None, help="override the preset's VQ steps")
    parser.add_argument("--gpt-steps", type=int, default=None, help="override the preset's target steps")
    parser.add_argument("--draft-steps", type=int, default=None, help="override the preset's drafter steps")
    parser.add_argument(
        "--low-res-draft-steps", type=int, default=None, help="override the preset's low-resolution drafter steps"
    )
    parser.add_argument("--upsampler-steps", type=int, default=None, help="override the preset's up-sampler steps")
    for stage in MAR_STAGES:
        parser.add_argument(f"--{stage}-steps", type=int, default=None, help=f"override the preset's {stage} steps")
    add_recipe_run_args(parser, saved="OUT/pipeline's weights", evaluation="evaluate_reference on OUT/pipeline")


def train_reference_command(args: argparse.Namespace) -> int:
    """Train the reference tokenizer / target / drafter (``mmspec train-reference``); returns 0."""
    check_train_reference_settings(args, [*STAGES, *MAR_STAGES])
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.stage in (*MAR_STAGES, "mar"):
        return train_mar_reference_stages(args)
    presets = reference_configs(args.preset, args.seed)
    common = {"resume": args.resume, "progress": not args.no_progress}
    if args.checkpoint_every is not None:
        common["checkpoint_every"] = args.checkpoint_every
    overrides = {
        "vq": args.vq_steps,
        "gpt": args.gpt_steps,
        "draft": args.draft_steps,
        "low-res-draft": args.low_res_draft_steps,
        "upsampler": args.upsampler_steps,
    }
    configs = {}
    for stage, config in presets.items():
        steps = {"steps": overrides[stage]} if overrides[stage] is not None else {}
        configs[stage] = dataclasses.replace(config, checkpoint_dir=str(out / "checkpoints" / stage), **common, **steps)
    stages = STAGES if args.stage == "all" else (args.stage,)
    timings: dict[str, float] = {}
    vq = None
    tokens: dict[EmojiDataConfig, torch.Tensor] = {}  # one tokenisation per rendering of the data
    for stage in stages:
        start = time.perf_counter()
        if stage == "vq":
            vq = train_vq(configs["vq"], args.device)
            vq.save_pretrained(out / "vq")
        else:
            if vq is None:
                if not (out / "vq").is_dir():
                    raise SystemExit(
                        f"error: stage {stage!r} needs a trained tokenizer in {out / 'vq'}: run --stage vq first"
                    )
                vq = LlamaGenVQ.from_pretrained(out / "vq").to(args.device).eval()
            if stage == "upsampler":
                low, high = upsampler_pairs(vq, configs[stage], tokens=tokens)
                train_upsampler(vq, configs[stage], low, high, args.device).save_pretrained(out / stage)
            else:
                tokens_of_stage = cached_tokens(vq, configs[stage].data, tokens)
                train_c2i_gpt(vq, configs[stage], tokens_of_stage, args.device).save_pretrained(out / stage)
        timings[stage] = time.perf_counter() - start
        print(f"{stage}: {timings[stage]:.1f} s -> {out / stage}")
    (out / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    missing = [stage for stage in STAGES if not (out / stage).is_dir()]
    if missing:
        print(
            f"{out / 'pipeline'} not assembled: stage(s) {', '.join(missing)} not trained yet "
            f"(`mmspec train-reference --stage STAGE --out {out}`)"
        )
    else:
        vq = LlamaGenVQ.from_pretrained(out / "vq").eval()
        gpts = {STAGE_COMPONENTS[stage]: LlamaGenGPT.from_pretrained(out / stage).eval() for stage in STAGE_COMPONENTS}
        recipe = {"preset": args.preset, "seed": args.seed, **{k: dataclasses.asdict(c) for k, c in configs.items()}}
        for config in recipe.values():
            if isinstance(config, dict):
                for key in ("checkpoint_dir", "resume", "progress"):
                    config.pop(key)
        pipe = save_reference_pipeline(
            vq,
            gpts["target"],
            gpts["drafter"],
            configs["vq"].data,
            out / "pipeline",
            recipe,
            dtype=getattr(torch, args.save_dtype),
            low_res_drafter=gpts["low_res_drafter"],
            upsampler=LlamaGenTokenUpsampler.from_pretrained(out / "upsampler").eval(),
        )
        print(f"pipeline -> {out / 'pipeline'}")
        if not args.no_eval:
            metrics = evaluate_reference(pipe, configs["vq"].data)
            (out / "eval.json").write_text(json.dumps(metrics, indent=1) + "\n")
            print(json.dumps(metrics, indent=1))
    return 0
