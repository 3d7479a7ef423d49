"""The LlamaGen family of ``mmspec generate`` / ``mmspec eval`` (class-conditional images; the
embedded reference model, saved folders, or official checkpoints). See :mod:`mmspec.app.generators`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from .generators import (
    CLASS_LABELS,
    BatchRun,
    FamilyJob,
    GenerationFamily,
    call_settings,
    check_eagle_args,
    eval_labels,
    load_eagle_head,
    register_family,
    save_image_result,
)
from .models import add_llamagen_source, llamagen_classes, load_llamagen


def _methods():
    from ..pipelines.llamagen.pipeline_llamagen import LLAMAGEN_METHODS

    return LLAMAGEN_METHODS


def _add_eval_args(group: argparse._ArgumentGroup) -> None:
    add_llamagen_source(group, model=False)
    group.add_argument(
        "--eagle-head",
        default=None,
        help="an EAGLE head folder trained for this model (speculative=eagle; also for janus / emu3 models)",
    )


def _add_args(group: argparse._ArgumentGroup) -> None:
    _add_eval_args(group)
    group.add_argument(
        "--eagle-tree",
        default=None,
        metavar="DEPTH,TOP_K,NODES",
        help="EAGLE-2 dynamic tree budget (default: a chain of --num-draft-tokens; also for janus / emu3 models)",
    )
    group.add_argument(
        "--heatmaps",
        action="store_true",
        help="also write an acceptance heat-map per image (also for janus / emu3 models)",
    )


def _check_args(args: argparse.Namespace) -> None:
    import os

    for flag in ("official_gpt", "official_vq"):
        value = getattr(args, flag, None)
        if value is not None and not os.path.isfile(value):
            raise SystemExit(f"error: --{flag.replace('_', '-')} {value}: no such file")
    check_eagle_args(args)


def _load(args: argparse.Namespace, path: Path | None, device, dtype):
    return load_eagle_head(args, load_llamagen(args, device, dtype, path=path))


def _prepare(pipe: Any, args: argparse.Namespace, device) -> FamilyJob:
    import torch

    from ..pipelines.validation import check_llamagen_call

    job = call_settings(pipe, args, device)
    call = job.call
    check_llamagen_call(pipe, [0], **call)  # settings against this model (vocabulary, sequence length)
    num_classes = pipe.target.config.num_classes

    def parse(value: str) -> int:
        try:
            label = int(value)
        except ValueError:
            raise ValueError(f"not a class id: {value!r}") from None
        if not 0 <= label < num_classes:
            raise ValueError(f"class id {label} is outside [0, {num_classes})")
        return label

    def process(items) -> list[dict]:
        start = time.perf_counter()
        out = pipe(
            class_labels=[it.value for it in items],
            generator=torch.Generator(device).manual_seed(args.seed + items[0].index),
            **call,
        )
        seconds = time.perf_counter() - start
        batch = BatchRun(out.stats, args.seed + items[0].index, seconds, tuple(out.tokens.shape[1:]))
        records = []
        for row, (item, image) in enumerate(zip(items, out.images)):
            name = f"{item.index:05d}_class{item.value}.png"
            records.append(save_image_result(args, batch, row, item, image, name, {"class_label": item.value}))
        return records

    settings = {
        **job.settings,
        "model": args.model or args.official_gpt or "embedded",
        "dtype": str(next(pipe.target.parameters()).dtype),
    }
    return FamilyJob(parse=parse, process=process, settings=settings, summary=job.summary)


def _evaluate(pipe: Any, args: argparse.Namespace, device) -> int:
    from .evaluation import (
        EvalMethod,
        OpenCLIPFeatures,
        TorchScriptFeatures,
        VQEncoderFeatures,
        evaluate_llamagen,
        format_report,
    )

    try:  # every spec is checked before the first image (a later method's mistake must not waste the run)
        methods = [EvalMethod.parse(m) for m in (args.method or ["sjd"])]
        for method in methods:
            pipe.resolve_speculation(
                method.speculative, method.speculative_options or None, method.acceptance, method.acceptance_options
            )
    except (ValueError, TypeError) as err:
        raise SystemExit(f"error: --method: {err}") from None
    num_classes = pipe.target.config.num_classes
    labels = eval_labels(args.classes, num_classes, args.num_images)
    clip = None
    if args.clip_model or args.clip_weights:
        if not (args.clip_model and args.clip_weights):
            raise SystemExit("error: CLIP score needs both --clip-model and --clip-weights")
        clip = OpenCLIPFeatures(args.clip_model, args.clip_weights)
    if args.features == "vq-encoder":
        features = VQEncoderFeatures(pipe.vq)
    elif args.features.startswith("torchscript:"):
        features = TorchScriptFeatures(args.features.split(":", 1)[1])
    elif args.features == "clip":
        if clip is None:
            raise SystemExit("error: --features clip needs --clip-model and --clip-weights")
        features = clip
    else:
        raise SystemExit(f"error: --features must be vq-encoder, torchscript:PATH or clip, got {args.features!r}")
    classes = llamagen_classes(args)
    class_names = None if classes is None else [entry["name"] for entry in classes]
    report = evaluate_llamagen(
        pipe,
        methods,
        labels,
        seed=args.seed,
        batch_size=args.batch_size,
        features=features,
        clip=clip,
        class_names=class_names,
        out_dir=args.output_dir,
        sampling={
            "guidance_scale": args.guidance_scale,
            "temperature": args.temperature,
            "top_k": args.top_k,
            "num_draft_tokens": args.num_draft_tokens,
        },
    )
    print(format_report(report))
    print(f"\nwrote {args.output_dir / 'report.json'} and {args.output_dir / 'grid.png'}")
    return 0


LLAMAGEN_FAMILY = register_family(
    GenerationFamily(
        name="llamagen",
        description="class-conditional LlamaGen images (the embedded reference model, saved folders, official .pt)",
        pipeline_class="LlamaGenPipeline",
        inputs=CLASS_LABELS,
        methods=_methods,
        load=_load,
        prepare=_prepare,
        default_method="sjd",
        embedded="llamagen-emoji",
        add_args=_add_args,
        check_args=_check_args,
        evaluate=_evaluate,
        add_eval_args=_add_eval_args,
    )
)
