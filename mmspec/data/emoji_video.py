"""Short emoji clips rendered offline: one glyph moving, bouncing, zooming or rotating over a
white or single-colour background (the video reference models' training data).

Clip ``i`` depends only on ``(seed, i)``: its class is ``i % num_classes`` (balanced), the motion
kind, path, size and background come from ``np.random.default_rng([seed, i])``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .emoji import _composite, _transform_glyph
from .emoji_glyphs import load_glyph_atlas, select_distinct_glyphs

MOTIONS = ("move", "bounce", "zoom", "rotate")


@dataclass(frozen=True)
class EmojiClipConfig:
    """The clips: ``num_clips`` of ``num_frames`` frames of ``image_size`` pixels, the first
    ``num_classes`` visually distinct glyphs as classes, glyph side ``glyph_scale`` of the frame."""

    image_size: int = 32
    num_frames: int = 8
    num_classes: int = 16
    num_clips: int = 4096
    seed: int = 0
    glyph_scale: float = 0.55

    def __post_init__(self) -> None:
        if self.image_size < 8 or self.num_frames < 1 or self.num_classes < 1 or self.num_clips < 1:
            raise ValueError(f"image_size >= 8 and num_frames, num_classes, num_clips >= 1 needed, got {self}")
        if not 0.1 <= self.glyph_scale <= 0.9:
            raise ValueError(f"glyph_scale must be in [0.1, 0.9], got {self.glyph_scale}")


def class_names(config: EmojiClipConfig) -> list[str]:
    """Caption text of each class, in label order."""
    atlas = load_glyph_atlas()
    return [atlas.glyphs[i].name for i in select_distinct_glyphs(atlas, config.num_classes)]


@functools.lru_cache(maxsize=8)
def _glyph_bases(num_classes: int, size: int) -> tuple[Image.Image, ...]:
    """Each class glyph once, premultiplied RGBa at twice the largest side a clip draws."""
    atlas = load_glyph_atlas()
    side = min(2 * size, atlas.images.shape[1])
    return tuple(
        Image.fromarray(atlas.images[i], "RGBa").resize((side, side), Image.LANCZOS)
        for i in select_distinct_glyphs(atlas, num_classes)
    )


def render_clip(config: EmojiClipConfig, index: int) -> tuple[np.ndarray, int, str]:
    """Clip ``index``: ``(frames uint8 [F, H, W, 3], label, motion)``."""
    rng = np.random.default_rng([config.seed, index])
    label = index % config.num_classes
    motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
    size = config.image_size
    base = _glyph_bases(config.num_classes, size)[label]
    background = np.ones((size, size, 3), np.float32)
    if rng.random() < 0.5:
        background[:] = rng.uniform(0.0, 1.0, 3).astype(np.float32)
    side = config.glyph_scale * size
    margin = side / 2
    x0, y0 = rng.uniform(margin, size - margin, 2)
    x1, y1 = rng.uniform(margin, size - margin, 2)
    phase, spin = rng.uniform(0, 2 * math.pi), rng.choice([-1.0, 1.0]) * rng.uniform(20.0, 45.0)
    frames = np.empty((config.num_frames, size, size, 3), np.uint8)
    for f in range(config.num_frames):
        s = f / max(config.num_frames - 1, 1)
        cx, cy, scale, angle = x0, y0, 1.0, 0.0
        if motion == "move":
            cx, cy = x0 + s * (x1 - x0), y0 + s * (y1 - y0)
        elif motion == "bounce":
            cx = x0 + s * (x1 - x0)
            cy = size - margin - abs(math.sin(phase + 2 * math.pi * s)) * (size - 2 * margin)
        elif motion == "zoom":
            scale = 0.6 + 0.4 * (0.5 + 0.5 * math.cos(phase + 2 * math.pi * s))
        else:
            angle = spin * f
        patch = _transform_glyph(base, max(1, round(side * scale)), angle)
        pixels = background.copy()
        _composite(pixels, patch, round(cx - patch.shape[1] / 2), round(cy - patch.shape[0] / 2))
        frames[f] = np.rint(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)
    return frames, label, motion


def render_clips(config: EmojiClipConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Every clip: ``(frames uint8 [N, F, 3, H, W], labels int64 [N])``."""
    frames = np.empty((config.num_clips, config.num_frames, 3, config.image_size, config.image_size), np.uint8)
    labels = torch.empty(config.num_clips, dtype=torch.long)
    for i in range(config.num_clips):
        clip, labels[i], _ = render_clip(config, i)
        frames[i] = clip.transpose(0, 3, 1, 2)
    return torch.from_numpy(frames), labels
