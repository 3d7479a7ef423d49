"""The video family of ``mmspec generate`` / ``mmspec eval`` (class-conditional block-autoregressive
video; the embedded emoji pair or a saved :class:`~mmspec.pipelines.video.VideoPipeline` folder).
See :mod:`mmspec.app.generators`.

SDVG routes on a frame scorer (``--scorer``) and a threshold τ (``--acceptance-option tau=...``).
Settings left out come from the model folder's ``sdvg.json`` (written by calibration,
:class:`~mmspec.app.models.VideoDefaults`): the scorer τ was calibrated for (the embedded pair:
``classifier``; a folder without the file: ``vlm``), τ itself, the target's denoising steps and the
drafter's (``--speculative-option draft_steps=N`` overrides the latter).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from .generators import CLASS_LABELS, FamilyJob, GenerationFamily, assets_dir, eval_labels, register_family
from .jobs_io import save_image_atomic
from .models import SDVG_FILE, VIDEO_EMBEDDED, VideoDefaults, build_scorer, calibrated_tau, load_video


def _methods():
    from ..pipelines.video import VIDEO_METHODS

    return VIDEO_METHODS


def add_scorer_args(group: argparse._ArgumentGroup) -> None:
    """``--scorer`` / ``--scorer-option`` (also used by ``mmspec eval`` and the demo)."""
    group.add_argument(
        "--scorer",
        default=None,
        help="frame scorer of SDVG's router: classifier (the embedded pair's frame classifier), vlm (the embedded "
        "captioner, VQAScore-style), clip, imagereward (default: the one the model's sdvg.json was calibrated for, "
        "else vlm)",
    )
    group.add_argument(
        "--scorer-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the scorer (repeatable), e.g. path=DIR (vlm), model_name=ViT-B-32 weights=FILE (clip)",
    )


def _add_eval_args(group: argparse._ArgumentGroup) -> None:
    add_scorer_args(group)
    group.add_argument("--num-frames", type=int, default=None, help="latent frames per video (default: the model's)")
    group.add_argument(
        "--num-inference-steps",
        type=int,
        default=None,
        help="the target's denoising steps per block (default: the model's sdvg.json, else 4)",
    )


def _add_args(group: argparse._ArgumentGroup) -> None:
    _add_eval_args(group)
    group.add_argument("--fps", type=float, default=8.0, help="frames per second of the written videos")
    group.add_argument("--video-scale", type=int, default=4, help="upscale frames this many times in the files")


def scorer_options(args: argparse.Namespace) -> dict:
    """The scorer's options, checked before any model loads: a path that does not exist is an error
    here (a missing weights file must not wait for the pipeline to load)."""
    from .jobs import parse_key_values

    try:
        options = parse_key_values(args.scorer_option, "--scorer-option")
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    for key in ("path", "weights"):
        value = options.get(key)
        if isinstance(value, str) and not os.path.exists(value):
            raise SystemExit(f"error: --scorer-option {key}={value}: no such file or folder")
    return options


def apply_model_defaults(args: argparse.Namespace, folder: Path) -> VideoDefaults:
    """Fill ``--scorer`` and ``--num-inference-steps`` the user left out from the model folder's
    :class:`VideoDefaults`; returns them (their ``draft_steps`` is the drafter's default)."""
    defaults = VideoDefaults.of(folder)
    if args.scorer is None:
        args.scorer = defaults.scorer
    if args.num_inference_steps is None:
        args.num_inference_steps = defaults.num_inference_steps
    return defaults


def with_draft_steps(speculative: str | None, options: dict, defaults: VideoDefaults) -> dict:
    """A drafting method's options with the model's default ``draft_steps`` unless the user gave one."""
    if speculative in ("sdvg", "draft-only") and "draft_steps" not in options and defaults.draft_steps is not None:
        return {**options, "draft_steps": defaults.draft_steps}
    return dict(options)


def _check_args(args: argparse.Namespace) -> None:
    from ..pipelines.video.scorers import FRAME_SCORERS

    # the CLI has resolved --model by now: a folder, or None for the embedded pair
    apply_model_defaults(args, Path(args.model) if args.model else assets_dir() / VIDEO_EMBEDDED)
    if args.num_frames is not None and args.num_frames < 1:
        raise SystemExit(f"error: --num-frames must be >= 1, got {args.num_frames}")
    if args.num_inference_steps < 1:
        raise SystemExit(f"error: --num-inference-steps must be >= 1, got {args.num_inference_steps}")
    if getattr(args, "fps", 1.0) <= 0 or getattr(args, "video_scale", 1) < 1:
        raise SystemExit("error: --fps must be > 0 and --video-scale >= 1")
    if args.scorer not in FRAME_SCORERS:
        raise SystemExit(f"error: --scorer {args.scorer}: unknown; available: {', '.join(sorted(FRAME_SCORERS))}")
    scorer_options(args)


def router_options(args: argparse.Namespace, pipe: Any, acceptance_options: dict) -> dict:
    """SDVG's rule options: the user's, with τ from the loaded model folder's ``sdvg.json`` when they
    give none (or an error)."""
    options = dict(acceptance_options)
    if "tau" not in options:
        tau = calibrated_tau(Path(pipe.name_or_path), args.scorer, options.get("aggregate", "min"))
        if tau is None:
            raise SystemExit(
                f"error: sdvg needs a threshold: --acceptance-option tau=VALUE (this model has no {SDVG_FILE} "
                f"calibrated for --scorer {args.scorer})"
            )
        options["tau"] = tau
    return options


def _load(args: argparse.Namespace, path: Path | None, device, dtype):
    apply_model_defaults(args, path or assets_dir() / VIDEO_EMBEDDED)  # eval reaches here without _check_args
    pipe = load_video(path, device, dtype)
    if getattr(args, "speculative", None) == "sdvg":
        pipe.set_scorer(build_scorer(args.scorer, scorer_options(args), device, path))
    return pipe


def _prepare(pipe: Any, args: argparse.Namespace, device) -> FamilyJob:
    import torch

    from .jobs import parse_key_values
    from .video_io import frame_strip, save_video

    acceptance_options = parse_key_values(args.acceptance_option, "--acceptance-option")
    speculative_options = parse_key_values(args.speculative_option, "--speculative-option")
    speculative = None if args.speculative == "none" else args.speculative
    defaults = VideoDefaults.of(Path(pipe.name_or_path))
    speculative_options = with_draft_steps(speculative, speculative_options, defaults)
    if speculative == "sdvg":
        acceptance_options = router_options(args, pipe, acceptance_options)
    spec = pipe.resolve_speculation(
        speculative,
        speculative_options,
        args.acceptance,
        {"tau": float("-inf")} if speculative == "draft-only" else acceptance_options,
    )
    num_blocks = pipe.num_blocks_for(args.num_frames)  # settings against this model, before any item
    call = {
        "num_frames": args.num_frames,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "speculative": speculative,
        "acceptance": args.acceptance if speculative == "sdvg" else None,
        "acceptance_options": acceptance_options if speculative == "sdvg" else None,
        "speculative_options": speculative_options or None,
    }
    names = pipe.class_names
    fpb = pipe.target.config.frames_per_block
    tau = getattr(spec.rule, "tau", None) if speculative == "sdvg" else None

    def parse(value: str) -> int:
        try:
            label = int(value)
        except ValueError:
            if value.strip().lower() in (n.lower() for n in names):
                return [n.lower() for n in names].index(value.strip().lower())
            raise ValueError(f"not a class id or class name: {value!r}") from None
        if not 0 <= label < len(names):
            raise ValueError(f"class id {label} is outside [0, {len(names)})")
        return label

    def process(items) -> list[dict]:
        seed = args.seed + items[0].index
        start = time.perf_counter()
        out = pipe(class_labels=[it.value for it in items], generator=torch.Generator().manual_seed(seed), **call)
        seconds = time.perf_counter() - start
        records = []
        for row, (item, video) in enumerate(zip(items, out.frames)):
            stem = f"{item.index:05d}_class{item.value}"
            saved = save_video(video, args.output_dir / f"{stem}.mp4", fps=args.fps, scale=args.video_scale)
            strip = frame_strip(
                video,
                fpb,
                scores=out.stats.scores[row],
                sources=out.stats.token_source[row],
                tau=tau,
                scale=args.video_scale,
            )
            save_image_atomic(strip, args.output_dir / f"{stem}_strip.png")
            records.append(
                {
                    "file": saved.path.name,
                    "strip": f"{stem}_strip.png",
                    "class_label": item.value,
                    "class_name": names[item.value],
                    "seed": seed,
                    "batch_seconds": seconds,
                    "batch_steps": out.stats.steps,
                    "row_steps": int(out.stats.row_steps[row]),
                    "row_accepted": int(out.stats.row_accepted[row]),
                    "block_sources": out.stats.token_source[row].tolist(),
                    "block_scores": [None if s != s else float(s) for s in out.stats.scores[row].tolist()],
                }
            )
        return records

    settings = {
        "command": "generate",
        "model": args.model or "embedded",
        "speculative": speculative,
        "speculative_options": {k: repr(v) for k, v in speculative_options.items()},
        "acceptance": repr(spec.rule) if speculative == "sdvg" else None,
        "scorer": args.scorer if speculative == "sdvg" else None,
        "scorer_options": parse_key_values(args.scorer_option, "--scorer-option") if speculative == "sdvg" else {},
        "num_frames": num_blocks * fpb,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
        "batch_size": args.batch_size,
    }
    summary = {
        "command": "generate",
        "speculative": speculative,
        "acceptance_rule": repr(spec.rule) if speculative == "sdvg" else None,
        "scorer": args.scorer if speculative == "sdvg" else None,
        "num_frames": num_blocks * fpb,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "device": str(device),
    }
    return FamilyJob(
        parse=parse,
        process=process,
        settings=settings,
        summary=summary,
        what="videos",
        rate_label="share of blocks kept from the draft",
    )


def _evaluate(pipe: Any, args: argparse.Namespace, device) -> int:
    from ..data.emoji_video import EmojiClipConfig, class_names, render_clips
    from .defaults import load_default_llamagen
    from .evaluation import EvalMethod, TorchScriptFeatures, VQEncoderFeatures
    from .video_eval import VideoRun, evaluate_video, format_video_report
    from .video_io import save_video

    try:
        methods = [EvalMethod.parse(m) for m in (args.method or ["sdvg"])]
    except ValueError as err:
        raise SystemExit(f"error: --method: {err}") from None
    defaults = VideoDefaults.of(Path(pipe.name_or_path))
    runs = []
    for method in methods:
        options = dict(method.acceptance_options)
        if method.speculative == "sdvg":
            options = router_options(args, pipe, options)
        method_options = with_draft_steps(method.speculative, method.speculative_options, defaults)
        runs.append(VideoRun(method.name, method.speculative, options, method_options))
    scorer = build_scorer(args.scorer, scorer_options(args), device, None if args.model is None else Path(args.model))
    pipe.set_scorer(scorer)
    for method, run in zip(methods, runs):  # every configuration (its rule too) is checked before the first video
        try:
            pipe.resolve_speculation(
                run.speculative, run.speculative_options or None, method.acceptance, run.acceptance_options
            )
        except (ValueError, TypeError) as err:
            raise SystemExit(f"error: --method {run.name}: {err}") from None
    num_blocks = pipe.num_blocks_for(args.num_frames)
    frames = num_blocks * pipe.target.config.frames_per_block
    labels = eval_labels(args.classes, pipe.target.config.num_classes, args.num_images)
    if args.features == "vq-encoder":  # the offline extractor of the LlamaGen eval: the embedded VQ's encoder
        features = VQEncoderFeatures(load_default_llamagen(device).vq)
    elif args.features.startswith("torchscript:"):
        features = TorchScriptFeatures(args.features.split(":", 1)[1])
    else:
        raise SystemExit(f"error: --features must be vq-encoder or torchscript:PATH for video, got {args.features!r}")
    real = None
    clips = EmojiClipConfig(
        image_size=pipe.vae.config.image_size,
        num_frames=frames,
        num_classes=pipe.target.config.num_classes,
        num_clips=max(args.num_images, 64),
        seed=1_000_003,  # held out: training clips use seeds 0..
    )
    if class_names(clips) == pipe.class_names:  # an emoji model: real held-out clips of its classes
        real = render_clips(clips)[0].float() / 255.0
    call = {
        "num_frames": frames,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
    }
    report = evaluate_video(
        pipe,
        runs,
        labels,
        seed=args.seed,
        batch_size=args.batch_size,
        call=call,
        scorer=scorer,
        features=features,
        real_frames=real,
        draft_options=with_draft_steps("draft-only", {}, defaults),
    )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for row in report["rows"]:  # the first video of each configuration, to look at
        save_video(row.pop("frames")[0], args.output_dir / f"{row['name'].replace(':', '_')}.gif", scale=4)
    (args.output_dir / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(format_video_report(report))
    print(f"\nwrote {args.output_dir / 'report.json'}")
    return 0


VIDEO_FAMILY = register_family(
    GenerationFamily(
        name="video",
        description="class-conditional block-autoregressive video with SDVG (the embedded emoji pair, saved folders)",
        pipeline_class="VideoPipeline",
        inputs=CLASS_LABELS,
        methods=_methods,
        load=_load,
        prepare=_prepare,
        default_method="sdvg",
        embedded=VIDEO_EMBEDDED,
        add_args=_add_args,
        check_args=_check_args,
        evaluate=_evaluate,
        add_eval_args=_add_eval_args,
    )
)
