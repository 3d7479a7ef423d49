"""What the Gradio demo apps share: queue and upload limits, the page style, showing a pipeline's
errors in the page, and launching an app with those limits (:mod:`mmspec.app.demos`)."""

from __future__ import annotations

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
PAGE_CSS = (
    ".mmspec-pixels img { width: 100% !important; height: 100% !important; object-fit: contain;"
    " image-rendering: pixelated; }"
)

#: Largest seed the demos accept (Gradio number boxes and API calls).
MAX_SEED = 2**31 - 1
#: Side of the image tabs' pictures and heat-maps, in pixels (token grids are scaled up to it).
PICTURE_SIZE = 256


def parse_class_label(value: Any, num_classes: int) -> int:
    """The class id chosen in the page (an int) or sent through the API (an int or its text, e.g.
    ``"0"``: an endpoint's schema types a dropdown as a string); ``gr.Error`` otherwise."""
    import gradio as gr

    text = str(value).strip() if value is not None else ""
    if isinstance(value, bool) or not (isinstance(value, int) or text.lstrip("-").isdigit()):
        raise gr.Error(f"class_label must be a class id (an integer in [0, {num_classes})), got {value!r}")
    label = int(text)
    if not 0 <= label < num_classes:
        raise gr.Error(f"class_label {label} is outside [0, {num_classes})")
    return label


def save_png(scratch: str, image: Any, name: str) -> str:
    """Write ``image`` (PIL) as ``<scratch>/<name>.png`` and return the path. Pictures go out as PNG
    files, not PIL images: Gradio caches files by content and copies them atomically, whereas it
    rewrites a re-sent PIL image's cache file in place, which breaks a download of the same picture
    still in flight (a preview or a finished image)."""
    import os

    path = os.path.join(scratch, f"{name}.png")
    image.save(path)
    return path


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
    return demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=f"{MAX_UPLOAD_MB}mb",
        show_error=True,
        css=PAGE_CSS,
        **kwargs,
    )
