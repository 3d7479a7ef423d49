"""The reference models' training data: emoji scenes rendered once per process (training and
held-out sets) and tokenised by a VQ (:mod:`mmspec.training.reference`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.emoji import AugmentConfig, EmojiDataset
from ..pipelines.llamagen import LlamaGenVQ

# Held-out items come from another dataset seed, so they are never among the training scenes.
HELDOUT_SEED_OFFSET = 1_000_003


# ---------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class EmojiDataConfig:
    """The emoji data every stage trains on (one config, so VQ and GPT see the same scenes).

    Args:
        image_size: image side in pixels; the token grid is ``image_size / vq downsampling``.
        num_classes: the first ``num_classes`` visually distinct glyphs
            (:func:`~mmspec.data.emoji.select_distinct_glyphs`) are the classes.
        num_samples: training scenes, rendered once per process and reused every epoch.
        heldout_samples: held-out scenes for evaluation (another dataset seed).
        seed: dataset seed (scene ``i`` depends only on it and ``i``).
        position_jitter, scale_range, rotation_degrees, backgrounds, max_glyphs_per_scene: the
            :class:`~mmspec.data.emoji.AugmentConfig` fields; modest so that 32-pixel classes stay
            learnable by a small GPT (scenes of several glyphs are captioned as a list, "a cat and
            two hearts": longer replies for a captioner; one glyph by default).
    """

    image_size: int = 32
    num_classes: int = 32
    num_samples: int = 16384
    heldout_samples: int = 256
    seed: int = 0
    position_jitter: float = 0.04
    scale_range: tuple[float, float] = (0.75, 0.9)
    rotation_degrees: float = 8.0
    backgrounds: tuple[str, ...] = ("white", "solid")
    max_glyphs_per_scene: int = 1

    def dataset(self, heldout: bool = False) -> EmojiDataset:
        """The training (or held-out) :class:`~mmspec.data.emoji.EmojiDataset`."""
        augment = AugmentConfig(
            position_jitter=self.position_jitter,
            scale_range=tuple(self.scale_range),
            rotation_degrees=self.rotation_degrees,
            backgrounds=tuple(self.backgrounds),
            max_glyphs_per_scene=self.max_glyphs_per_scene,
        )
        return EmojiDataset(
            image_size=self.image_size,
            num_samples=self.heldout_samples if heldout else self.num_samples,
            seed=self.seed + HELDOUT_SEED_OFFSET if heldout else self.seed,
            classes=self.num_classes,
            augment=augment,
            return_pil=True,
        )


@functools.lru_cache(maxsize=4)
def render_images(data: EmojiDataConfig, heldout: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Render the whole training (or held-out) set once, cached for the process.

    Rendering is the slowest part of a data step on a CPU, so scenes are drawn once and sampled
    from memory (as uint8, a quarter of the float size).

    Returns:
        ``(images uint8 [N, 3, H, W], labels int64 [N])``.
    """
    dataset = data.dataset(heldout)
    images = np.empty((len(dataset), 3, data.image_size, data.image_size), dtype=np.uint8)
    labels = torch.empty(len(dataset), dtype=torch.long)
    for i in tqdm(range(len(dataset)), desc="render emoji", leave=False, disable=len(dataset) < 2048):
        item = dataset[i]
        images[i] = np.asarray(item["image"]).transpose(2, 0, 1)
        labels[i] = item["label"]
    return torch.from_numpy(images), labels


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[0, 255]`` images -> float ``[-1, 1]`` (the VQ's input range)."""
    return images.float() / 127.5 - 1.0


@torch.no_grad()
def tokenize_images(vq: LlamaGenVQ, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Encode uint8 images ``[N, 3, H, W]`` (on any device) to token ids ``[N, h*w]`` (raster
    order, on the CPU), in batches on ``vq``'s device."""
    out = []
    for first in range(0, images.shape[0], batch_size):
        _, indices = vq.encode(to_model_range(images[first : first + batch_size].to(vq.device)))
        out.append(indices.flatten(1).cpu())
    return torch.cat(out)
