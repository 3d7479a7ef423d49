"""The LlamaGen family of ``mmspec generate`` / ``mmspec eval`` (class-conditional images; the
embedded reference model, saved folders, or official checkpoints). See :mod:`mmspec.app.generators`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from .generators import CLASS_LABELS, FamilyJob, GenerationFamily, register_family
from .models import add_llamagen_source, llamagen_classes, load_llamagen


def _methods():
    from ..pipelines.llamagen.pipeline_llamagen import LLAMAGEN_METHODS

    return LLAMAGEN_METHODS


def _add_eval_args(group: argparse._ArgumentGroup) -> None:
    add_llamagen_source(group, model=False)
    group.add_argument(
        "--eagle-head", default=None, help="an EAGLE head folder trained for this model (speculative=eagle)"
    )


def _add_args(group: argparse._ArgumentGroup) -> None:
    _add_eval_args(group)
    group.add_argument(
        "--eagle-tree",
        default=None,
        metavar="DEPTH,TOP_K,NODES",
        help="EAGLE-2 dynamic tree budget (default: a chain of --num-draft-tokens)",
    )
    group.add_argument("--heatmaps", action="store_true", help="also write an acceptance heat-map per image")


def _check_args(args: argparse.Namespace) -> None:
    import os

    for flag in ("official_gpt", "official_vq"):
        value = getattr(args, flag, None)
        if value is not None and not os.path.isfile(value):
            raise SystemExit(f"error: --{flag.replace('_', '-')} {value}: no such file")
    if args.eagle_head is not None and not os.path.isdir(args.eagle_head):
        raise SystemExit(f"error: --eagle-head {args.eagle_head}: no such folder")
    if args.eagle_tree:
        parts = args.eagle_tree.split(",")
        if len(parts) != 3 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
            raise SystemExit(
                f"error: --eagle-tree must be three positive integers DEPTH,TOP_K,NODES, got {args.eagle_tree!r}"
            )
        if args.speculative != "eagle":
            raise SystemExit("error: --eagle-tree needs --speculative eagle")


def _load(args: argparse.Namespace, path: Path | None, device, dtype):
    pipe = load_llamagen(args, device, dtype, path=path)
    if getattr(args, "eagle_head", None):
        try:
            pipe.load_eagle_head(args.eagle_head)
        except (OSError, ValueError) as err:
            raise SystemExit(f"error: --eagle-head {args.eagle_head}: {err}") from None
    return pipe


def _prepare(pipe: Any, args: argparse.Namespace, device) -> FamilyJob:
    import torch

    from ..drafters.eagle import TreeConfig
    from ..pipelines.validation import check_llamagen_call
    from ..sampling import SamplingConfig
    from .jobs import parse_key_values
    from .visualize import acceptance_heatmap

    acceptance_options = parse_key_values(args.acceptance_option, "--acceptance-option")
    speculative_options = parse_key_values(args.speculative_option, "--speculative-option")
    speculative = None if args.speculative == "none" else args.speculative
    num_draft_tokens = args.num_draft_tokens
    if args.eagle_tree:
        depth, top_k, nodes = (int(x) for x in args.eagle_tree.split(","))
        speculative_options["tree"] = TreeConfig(depth=depth, top_k=top_k, total_nodes=nodes)
        num_draft_tokens = depth  # a tree's num_draft_tokens is its depth
    # The method's drafter and the rule are built (and their settings checked) once, here: inside
    # the job a ValueError would only mark items as bad.
    spec = pipe.resolve_speculation(speculative, speculative_options, args.acceptance, acceptance_options)
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if spec.rule.requires_greedy and not sampling.greedy:
        raise ValueError(f"rule {spec.rule!r} needs greedy decoding: add --temperature 0 (or --top-k 1)")
    call = {
        "guidance_scale": args.guidance_scale,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "speculative": speculative,
        "num_draft_tokens": num_draft_tokens,
        "acceptance": spec.rule,
        "speculative_options": speculative_options or None,
    }
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
        from .cli import save_image_atomic

        start = time.perf_counter()
        out = pipe(
            class_labels=[it.value for it in items],
            generator=torch.Generator(device).manual_seed(args.seed + items[0].index),
            **call,
        )
        seconds = time.perf_counter() - start
        grid = out.tokens.shape[1:]
        records = []
        for row, (item, image) in enumerate(zip(items, out.images)):
            name = f"{item.index:05d}_class{item.value}.png"
            save_image_atomic(image, args.output_dir / name)
            record = {
                "file": name,
                "class_label": item.value,
                "seed": args.seed + items[0].index,
                "batch_steps": out.stats.steps,
                "batch_seconds": seconds,
                "row_steps": int(out.stats.row_steps[row]),
                "row_accepted": int(out.stats.row_accepted[row]),
            }
            if args.heatmaps:
                heat = f"{item.index:05d}_accept.png"
                source, step = out.stats.token_source[row].reshape(grid), out.stats.token_step[row].reshape(grid)
                save_image_atomic(acceptance_heatmap(source, step), args.output_dir / heat)
                record["heatmap"] = heat
            records.append(record)
        return records

    settings = {  # what makes the images what they are: a resumed job must not change them
        "command": "generate",
        "model": args.model or args.official_gpt or "embedded",
        "speculative": speculative,
        "speculative_options": {k: repr(v) for k, v in speculative_options.items()},
        "acceptance": repr(spec.rule),
        "num_draft_tokens": num_draft_tokens,
        "guidance_scale": args.guidance_scale,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "dtype": str(next(pipe.target.parameters()).dtype),
    }
    summary = {
        "command": "generate",
        "speculative": speculative,
        "acceptance": spec.rule.name,
        "acceptance_options": acceptance_options,
        "acceptance_rule": repr(spec.rule),  # resolved, e.g. variant="official"
        "speculative_options": {
            k: v if isinstance(v, (int, float, str, bool)) else repr(v) for k, v in speculative_options.items()
        },
        "num_draft_tokens": num_draft_tokens,
        "guidance_scale": args.guidance_scale,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "device": str(device),
    }
    return FamilyJob(parse=parse, process=process, settings=settings, summary=summary)


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
    pool = [int(c) for c in args.classes.split(",")] if args.classes else list(range(num_classes))
    labels = [pool[i % len(pool)] for i in range(args.num_images)]
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
