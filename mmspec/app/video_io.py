"""Video outputs people look at: files (mp4, or an animated GIF when no mp4 writer is installed),
a frame strip of the blocks with their router scores and sources, and the quality-vs-speed plot of
a τ sweep (SDVG, issue 15).

Frames are one video: ``[F, 3, H, W]`` (torch or numpy) floats in [0, 1] or uint8, ``[F, H, W, 3]``
(diffusers' ``output_type="np"`` layout) likewise, or a list of PIL images.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..stats import SOURCE_ACCEPTED, SOURCE_PREFILL, SOURCE_RECOVERED
from .visualize import SOURCE_COLOURS

#: What a τ-sweep record holds (:func:`tau_sweep_plot`).
SWEEP_KEYS = ("tau", "speedup", "quality_mean", "quality_worst")
#: What each block source means in a frame strip.
SOURCE_NAMES = {
    SOURCE_PREFILL: "target (forced)",
    SOURCE_ACCEPTED: "draft kept",
    SOURCE_RECOVERED: "draft rejected: target",
}


@dataclass(frozen=True)
class SavedVideo:
    """What :func:`save_video` wrote: ``path`` (may differ from the requested one: a GIF fallback
    has the suffix ``.gif``), ``format`` ("mp4" or "gif"), ``writer`` (the library that wrote it) and
    ``note`` (one line for the user, e.g. why a GIF was written instead of an mp4)."""

    path: Path
    format: str
    writer: str
    note: str


def video_to_uint8(frames: Any) -> np.ndarray:
    """Frames as ``uint8 [F, H, W, 3]``.

    Raises:
        ValueError: not one video of RGB frames (the message gives the shape).
    """
    if isinstance(frames, (list, tuple)) and frames and all(isinstance(f, PIL.Image.Image) for f in frames):
        return np.stack([np.asarray(f.convert("RGB")) for f in frames])
    array = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.ndim != 4 or (array.shape[1] != 3 and array.shape[-1] != 3) or array.shape[0] == 0:
        raise ValueError(
            f"a video must be [F, 3, H, W] or [F, H, W, 3] (one video of RGB frames), got shape {array.shape}"
        )
    if array.shape[1] == 3 and array.shape[-1] != 3:
        array = array.transpose(0, 2, 3, 1)
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"video frames must be floats in [0, 1] or uint8, got {array.dtype}")
    return np.ascontiguousarray((np.nan_to_num(array.astype(np.float32)).clip(0, 1) * 255).round().astype(np.uint8))


def _upscale(video: np.ndarray, scale: int) -> np.ndarray:  # [F, H, W, 3] -> [F, H*scale, W*scale, 3]
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    return video if scale == 1 else video.repeat(scale, axis=1).repeat(scale, axis=2)


def mp4_writer() -> str | None:
    """The mp4 writer available here: "imageio" (``imageio`` + ``imageio-ffmpeg``, the ``video``
    extra), "torchvision" (``torchvision.io.write_video`` with PyAV), or None."""
    if importlib.util.find_spec("imageio") and importlib.util.find_spec("imageio_ffmpeg"):
        return "imageio"
    if importlib.util.find_spec("torchvision") and importlib.util.find_spec("av"):
        try:
            import torchvision.io  # noqa: F401  (a torchvision without its compiled ops fails here)
        except (ImportError, RuntimeError):
            return None
        return "torchvision"
    return None


def save_video(frames: Any, path: str | os.PathLike, fps: float = 8.0, scale: int = 1) -> SavedVideo:
    """Write one video to ``path`` (``.mp4`` or ``.gif``), each frame upscaled ``scale`` times
    (nearest neighbour, for tiny videos).

    mp4 (H.264, yuv420p): through ``imageio`` + ``imageio-ffmpeg`` (``pip install 'mmspec[video]'``) or
    ``torchvision.io`` with PyAV; odd frame sizes are padded by one pixel (edge copies), as H.264's
    4:2:0 needs even sizes. Without either writer the video is written as an animated GIF (PIL) next
    to ``path`` with the suffix ``.gif``, a ``UserWarning`` says so, and the returned ``note`` too.

    Raises:
        ValueError: another suffix, a bad ``fps`` / ``scale``, or frames that are not one video.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".mp4", ".gif"):
        raise ValueError(f"save_video writes .mp4 or .gif files, got {os.fspath(path)!r}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    video = _upscale(video_to_uint8(frames), scale)  # [F, H, W, 3]
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".mp4":
        writer = mp4_writer()
        if writer is not None:
            even = np.pad(video, ((0, 0), (0, video.shape[1] % 2), (0, video.shape[2] % 2), (0, 0)), mode="edge")
            if writer == "imageio":
                import imageio.v2 as imageio

                imageio.mimwrite(path, list(even), fps=fps, codec="libx264", macro_block_size=1, pixelformat="yuv420p")
            else:
                import torchvision.io

                torchvision.io.write_video(os.fspath(path), torch.from_numpy(even), fps=fps, video_codec="libx264")
            return SavedVideo(path, "mp4", writer, f"wrote {path} (mp4, {len(video)} frames, {fps:g} fps, {writer})")
        gif = path.with_suffix(".gif")
        note = (
            f"no mp4 writer installed (pip install 'mmspec[video]' for imageio + imageio-ffmpeg): wrote an "
            f"animated GIF {gif} instead of {path}"
        )
        warnings.warn(note, UserWarning, stacklevel=2)
    else:
        gif, note = path, f"wrote {path} (animated GIF, {len(video)} frames, {fps:g} fps)"
    images = [PIL.Image.fromarray(f) for f in video]
    # GIF frame durations are whole milliseconds (most viewers round to 10 ms); loop=0 loops forever
    images[0].save(gif, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0, optimize=False)
    return SavedVideo(gif, "gif", "PIL", note)


def frame_strip(
    frames: Any,
    block_size: int,
    scores: Sequence[float] | torch.Tensor | None = None,
    accepted: Sequence[bool] | torch.Tensor | None = None,
    sources: Sequence[int] | torch.Tensor | None = None,
    tau: float | None = None,
    scale: int = 1,
) -> PIL.Image.Image:
    """One row per block (its ``block_size`` frames side by side), framed in its source's colour
    (:data:`mmspec.app.visualize.SOURCE_COLOURS`: grey = forced target block, green = draft kept,
    red = draft rejected and regenerated by the target), with a label: block index, source, the
    router's score of the drafted block and its comparison with ``tau``.

    Args:
        frames: one video (``[F, 3, H, W]`` etc., see the module docstring), ``F`` a multiple of
            ``block_size``.
        scores: ``[num_blocks]`` the router's aggregated score of each drafted block (NaN or None
            where none was drafted), e.g. a row of ``BlockStats.scores``.
        accepted: ``[num_blocks]`` whether each block's draft was kept (used when ``sources`` is None:
            kept = green, otherwise red).
        sources: ``[num_blocks]`` ``mmspec.stats`` source codes (a row of ``BlockStats.token_source``).
        tau: the router's threshold, shown beside each score.
        scale: integer upscaling of the frames (nearest neighbour).

    Raises:
        ValueError: ``F`` not a multiple of ``block_size``, or per-block inputs of the wrong length.
    """
    from PIL import ImageDraw, ImageFont

    video = _upscale(video_to_uint8(frames), scale)  # [F, H, W, 3]
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    if len(video) % block_size:
        raise ValueError(f"{len(video)} frames are not a whole number of blocks of {block_size}")
    num_blocks = len(video) // block_size
    per_block = {}
    for name, values in (("scores", scores), ("accepted", accepted), ("sources", sources)):
        if values is not None:
            values = values.detach().cpu().tolist() if isinstance(values, torch.Tensor) else list(values)
            if len(values) != num_blocks:
                raise ValueError(f"{name} has {len(values)} entries for {num_blocks} blocks")
            per_block[name] = values
    if "sources" not in per_block and "accepted" in per_block:
        per_block["sources"] = [SOURCE_ACCEPTED if a else SOURCE_RECOVERED for a in per_block["accepted"]]
    labels = []
    for i in range(num_blocks):
        source = per_block["sources"][i] if "sources" in per_block else None
        parts = [f"block {i}"]
        if source is not None:
            parts.append(SOURCE_NAMES.get(source, f"source {source}"))
        score = per_block["scores"][i] if "scores" in per_block else None
        if score is not None and math.isfinite(score):
            parts.append(
                f"score {score:.3g}" + ("" if tau is None else f" {'>=' if score >= tau else '<'} tau {tau:.3g}")
            )
        labels.append(", ".join(parts))
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(PIL.Image.new("RGB", (1, 1)))
    _, h, w, _ = video.shape
    border, gap = 3, 2
    label_width = max(int(measure.textlength(label, font=font)) for label in labels) + 8
    row_width = block_size * (w + gap) - gap + 2 * border
    canvas = PIL.Image.new("RGB", (row_width + label_width + gap, num_blocks * (h + 2 * border + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(num_blocks):
        top = gap + i * (h + 2 * border + gap)
        source = per_block["sources"][i] if "sources" in per_block else None
        colour = SOURCE_COLOURS.get(source, (255, 255, 255)) if source is not None else (255, 255, 255)
        draw.rectangle([0, top, row_width - 1, top + h + 2 * border - 1], fill=colour)
        for j in range(block_size):
            frame = PIL.Image.fromarray(video[i * block_size + j])
            canvas.paste(frame, (border + j * (w + gap), top + border))
        draw.text((row_width + gap + 4, top + border + h // 2), labels[i], fill=(0, 0, 0), font=font, anchor="lm")
    return canvas


def tau_sweep_plot(
    rows: Sequence[Mapping[str, float] | Any], path: str | os.PathLike, quality_label: str = "quality (scorer)"
) -> Path:
    """Quality against speed-up of a τ sweep, one point per τ, written to ``path`` (any format
    matplotlib saves: .png, .svg, .pdf). Two series: the scorer's mean frame score and its
    worst-frame score; each point is labelled with its τ (±inf = target-only / draft-only).

    Args:
        rows: records (mappings or dataclasses) with :data:`SWEEP_KEYS`: ``tau``, ``speedup``
            (vs target-only in the same run), ``quality_mean``, ``quality_worst``.
        quality_label: the y axis' label (e.g. the scorer's name and whether values are relative).

    Raises:
        ValueError: no rows, or a row missing a key. ImportError: matplotlib (the ``plot`` extra) is missing.
    """
    records = [asdict(r) if is_dataclass(r) else dict(r) for r in rows]
    if not records:
        raise ValueError("tau_sweep_plot needs at least one record")
    for i, record in enumerate(records):
        missing = [k for k in SWEEP_KEYS if k not in record]
        if missing:
            raise ValueError(f"tau-sweep record {i} lacks {', '.join(missing)} (each needs {', '.join(SWEEP_KEYS)})")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("tau_sweep_plot needs matplotlib: pip install 'mmspec[plot]'") from err
    records.sort(key=lambda r: r["speedup"])
    speed = [r["speedup"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(speed, [r["quality_mean"] for r in records], "o-", label="mean frame score")
    ax.plot(speed, [r["quality_worst"] for r in records], "s--", label="worst-frame score")
    for r in records:
        tau = r["tau"]
        text = {math.inf: "τ=+∞ (target)", -math.inf: "τ=−∞ (draft)"}.get(tau, f"τ={tau:.3g}")
        ax.annotate(text, (r["speedup"], r["quality_mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("speed-up vs target-only (same run)")
    ax.set_ylabel(quality_label)
    ax.set_title("SDVG τ sweep: quality vs speed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
