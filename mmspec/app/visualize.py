"""Pictures people would rather look at than numbers: image grids and acceptance heat-maps."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch

from ..stats import SOURCE_ACCEPTED, SOURCE_BONUS, SOURCE_PREFILL, SOURCE_RECOVERED

#: Colours of the token sources in :func:`acceptance_heatmap` (RGB).
SOURCE_COLOURS = {
    SOURCE_PREFILL: (120, 120, 120),  # grey: sampled from the prefill
    SOURCE_ACCEPTED: (46, 160, 67),  # green: a draft the target accepted
    SOURCE_RECOVERED: (215, 58, 73),  # red: resampled after a rejection
    SOURCE_BONUS: (3, 102, 214),  # blue: bonus after a fully accepted draft (or a plain AR step)
}


def image_grid(
    images: list[PIL.Image.Image],
    cols: int,
    pad: int = 2,
    background=(255, 255, 255),
    row_labels: list[str] | None = None,
) -> PIL.Image.Image:
    """Tile equally sized images row-major into one picture; ``row_labels`` (one per row) are
    written in a column on the left."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    width, height = images[0].size
    rows = (len(images) + cols - 1) // cols
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"image_grid got {len(row_labels)} row labels for {rows} rows")
    left = 0
    if row_labels:
        from PIL import ImageDraw, ImageFont

        font = ImageFont.load_default()
        measure = ImageDraw.Draw(PIL.Image.new("RGB", (1, 1)))
        left = max(int(measure.textlength(label, font=font)) for label in row_labels) + 2 * pad
    grid = PIL.Image.new("RGB", (left + cols * (width + pad) + pad, rows * (height + pad) + pad), background)
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), (left + pad + (i % cols) * (width + pad), pad + (i // cols) * (height + pad)))
    if row_labels:
        draw = ImageDraw.Draw(grid)
        for row, label in enumerate(row_labels):
            draw.text((pad, pad + row * (height + pad) + height // 2), label, fill=(0, 0, 0), font=font, anchor="lm")
    return grid


def acceptance_heatmap(
    token_source: torch.Tensor,  # [h, w] token origins (mmspec.stats.TOKEN_SOURCES)
    token_step: torch.Tensor,  # [h, w] verify step that committed each token
    cell: int = 16,
) -> PIL.Image.Image:
    """Per grid position: colour = where the token came from, brightness alternates with the
    verify step, so the runs of tokens committed together by one step are visible."""
    source = token_source.cpu().numpy()
    step = token_step.cpu().numpy()
    h, w = source.shape
    rgb = np.zeros((h, w, 3), dtype=np.float32)
    for kind, colour in SOURCE_COLOURS.items():
        rgb[source == kind] = colour
    rgb *= np.where(step % 2 == 0, 1.0, 0.72)[..., None]  # neighbouring steps differ in shade
    image = PIL.Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    return image.resize((w * cell, h * cell), PIL.Image.NEAREST)
