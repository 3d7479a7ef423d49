"""Gradio demos: ``mmspec demo image|chat``.

The apps live in :mod:`mmspec.demos.image_app` and :mod:`mmspec.demos.chat_app` (they import
gradio, the ``demo`` extra); this module holds what both share and the command-line entry, and
imports gradio only when a demo is actually launched, so ``mmspec`` works without it.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

#: Queue limits: one generation at a time (pipelines reuse their static KV caches across calls,
#: and one job already uses the whole device); a bounded waiting line so that a crowd gets a clear
#: "queue is full" instead of an ever-longer wait.
CONCURRENCY_LIMIT = 1
MAX_QUEUE_SIZE = 16
#: Largest upload accepted by the chat demo (checked by Gradio at upload time and again by the app).
MAX_UPLOAD_MB = 10
#: Page style: generated images are often a few dozen pixels wide; Gradio shows them at their
#: natural size, so images marked ``mmspec-pixels`` are scaled up to their box, without blurring.
PAGE_CSS = (".mmspec-pixels img { width: 100% !important; height: 100% !important; object-fit: contain;"
            " image-rendering: pixelated; }")


@contextlib.contextmanager
def pipeline_errors() -> Iterator[None]:
    """Show a pipeline's ``ValueError`` (impossible settings, e.g. the greedy rule with sampling)
    to the user as a Gradio error message instead of a generic failure."""
    import gradio as gr

    try:
        yield
    except ValueError as err:
        raise gr.Error(str(err)) from err


def launch(demo: Any, host: str = "127.0.0.1", port: int | None = None, share: bool = False, **kwargs: Any) -> Any:
    """Queue and launch a demo with mmspec's limits; loopback only unless ``host``/``share`` say otherwise.

    ``kwargs`` go to ``Blocks.launch`` (e.g. ``prevent_thread_lock=True`` in tests).
    """
    demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT, max_size=MAX_QUEUE_SIZE)
    return demo.launch(server_name=host, server_port=port, share=share, max_file_size=f"{MAX_UPLOAD_MB}mb",
                       show_error=True, css=PAGE_CSS, **kwargs)


def add_demo_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mmspec demo``."""
    from ..cli import _add_device, _add_llamagen_source

    parser.add_argument("app", choices=["image", "chat"], help="image generation (LlamaGen) or visual chat (VLM)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's first free port from 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    _add_device(parser)
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--vlm", default=None, help="chat: a transformers VLM checkpoint folder (LLaVA, Qwen2-VL, ...; "
                        "default: the embedded emoji captioner)")
    _add_llamagen_source(parser)


def demo_command(args: argparse.Namespace) -> int:
    """Build the chosen demo on its pipeline and serve it until interrupted."""
    try:
        import gradio  # noqa: F401  (only checks that the extra is installed)
    except ImportError:
        raise SystemExit("the demos need Gradio: pip install 'mmspec[demo]'") from None
    from ..cli import resolve_device, resolve_dtype

    device = resolve_device(args.device)

    dtype = resolve_dtype(args.dtype, device)
    if args.app == "image":
        from ..cli import llamagen_classes, load_llamagen
        from .image_app import build_image_demo

        classes = llamagen_classes(args)
        names = None if classes is None else [f"{entry['char']} {entry['name']}" for entry in classes]
        demo = build_image_demo(load_llamagen(args, device, dtype), class_names=names)
    else:
        from ..defaults import load_captioner_pipeline, load_default_captioner
        from .chat_app import build_chat_demo

        try:  # the embedded emoji captioner by default; --vlm DIR for any LLaVA / Qwen2-VL checkpoint
            pipe = load_default_captioner(device) if args.vlm is None else load_captioner_pipeline(args.vlm, device)
        except FileNotFoundError as err:
            raise SystemExit(f"mmspec demo chat: {err} (or pass --vlm DIR, a transformers VLM checkpoint folder)") from None
        demo = build_chat_demo(pipe)
    launch(demo, host=args.host, port=args.port, share=args.share)
    return 0
