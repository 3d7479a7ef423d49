"""Gradio demos: ``mmspec demo image|chat``.

The apps live in :mod:`mmspec.app.demos.image_app` (with its MAR and video tabs in
:mod:`~mmspec.app.demos.mar_tab` and :mod:`~mmspec.app.demos.video_tab`) and
:mod:`mmspec.app.demos.chat_app` (they import gradio, the ``demo`` extra), what both share (limits, error display, launching) in
:mod:`mmspec.app.demos.serving`; this module is the command-line entry, and imports gradio only
when a demo is actually launched, so ``mmspec`` works without it.
"""

from __future__ import annotations

import argparse

from ..models import add_device, add_llamagen_source, llamagen_classes, load_llamagen, resolve_device, resolve_dtype
from .serving import launch


def add_demo_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mmspec demo``."""
    parser.add_argument("app", choices=["image", "chat"], help="image generation (LlamaGen) or visual chat (VLM)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's first free port from 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    add_device(parser)
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument(
        "--vlm",
        default=None,
        help="chat: a transformers VLM checkpoint folder (LLaVA, Qwen2-VL, ...; default: the embedded emoji captioner)",
    )
    parser.add_argument(
        "--mar",
        default="embedded",
        help="image demo: the MAR tab's pipeline (a saved MARPipeline folder; 'embedded': the emoji pair; "
        "'none': no tab)",
    )
    parser.add_argument(
        "--video",
        default="embedded",
        help="image demo: the video tab's VideoPipeline folder ('embedded': the emoji pair; 'none': no tab); "
        "SDVG scores frames with the embedded captioner at the folder's calibrated tau",
    )
    add_llamagen_source(parser)


def demo_command(args: argparse.Namespace) -> int:
    """Build the chosen demo on its pipeline and serve it until interrupted."""
    try:
        import gradio  # noqa: F401  (only checks that the extra is installed)
    except ImportError:
        raise SystemExit("the demos need Gradio: pip install 'mmspec[demo]'") from None
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.app == "image":
        from .image_app import build_image_demo

        classes = llamagen_classes(args)
        names = None if classes is None else [f"{entry['char']} {entry['name']}" for entry in classes]
        demo = build_image_demo(
            load_llamagen(args, device, dtype),
            class_names=names,
            mar=_mar_tab_inputs(args, device),
            video=_video_tab_inputs(args, device),
        )
    else:
        from ...training.saved import load_captioner_pipeline
        from ..defaults import load_default_captioner
        from .chat_app import build_chat_demo

        try:  # the embedded emoji captioner by default; --vlm DIR for any LLaVA / Qwen2-VL checkpoint
            pipe = load_default_captioner(device) if args.vlm is None else load_captioner_pipeline(args.vlm, device)
        except FileNotFoundError as err:
            raise SystemExit(
                f"mmspec demo chat: {err} (or pass --vlm DIR, a transformers VLM checkpoint folder)"
            ) from None
        demo = build_chat_demo(pipe)
    launch(demo, host=args.host, port=args.port, share=args.share)
    return 0


def _mar_tab_inputs(args: argparse.Namespace, device) -> tuple | None:
    """``(MARPipeline with its draft, class names or None)`` for the image demo's MAR tab."""
    if args.mar == "none":
        return None
    from ..defaults import default_mar_classes, load_default_mar, load_mar_folder

    try:
        mar = load_default_mar(device) if args.mar == "embedded" else load_mar_folder(args.mar, device)
    except (OSError, ValueError) as err:
        raise SystemExit(f"mmspec demo image: --mar {args.mar}: {err}") from None
    names = None
    if args.mar == "embedded":
        names = [f"{entry['char']} {entry['name']}" for entry in default_mar_classes()]
    return mar, names


def _video_tab_inputs(args: argparse.Namespace, device) -> tuple | None:
    """``(VideoPipeline with drafter and scorer, calibrated tau, VideoDefaults)`` for the image demo's
    video tab: the scorer, τ and step counts the model folder's ``sdvg.json`` was calibrated with."""
    if args.video == "none":
        return None
    from pathlib import Path

    from ..models import VideoDefaults, build_scorer, calibrated_tau, load_video

    pipe = load_video(None if args.video == "embedded" else Path(args.video), device)
    defaults = VideoDefaults.of(Path(pipe.name_or_path))
    tau = calibrated_tau(Path(pipe.name_or_path), defaults.scorer, "min")
    if tau is None:
        raise SystemExit(f"mmspec demo image: {args.video} has no sdvg.json calibrated for a frame scorer")
    pipe.set_scorer(build_scorer(defaults.scorer, {}, device))
    return pipe, tau, defaults
