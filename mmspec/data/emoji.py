"""Image–caption / class-label dataset rendered offline from the Noto Color Emoji font.

Every single-code-point emoji that the font draws becomes one class.  Its caption text is the
lower-cased Unicode character name (``unicodedata.name(ch).lower()``, e.g. "grinning face",
"red apple") and it belongs to one coarse group of :data:`~mmspec.data.emoji_groups.GROUPS`.  :class:`EmojiDataset` draws
scenes of one to a few glyphs on random backgrounds, deterministically in ``(seed, index)``, to
train small reference models (VQ tokenizer + class-conditional GPT, captioning VLM) on a CPU
without downloading anything.

The glyphs and the font: :mod:`mmspec.data.emoji_glyphs`; the coarse groups:
:mod:`mmspec.data.emoji_groups`.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .emoji_glyphs import GLYPH_SIZE, Glyph, load_glyph_atlas, select_distinct_glyphs

BACKGROUND_KINDS = ("white", "solid", "gradient", "noise")


# Name openings where the first letter picks the wrong article ("a unicorn", "an hourglass").
_A_PREFIXES = ("uni", "eu", "one", "u-", "ufo", "use")
_AN_PREFIXES = ("hour", "x-")
_PREPOSITIONS = frozenset({"with", "over", "of", "in", "on", "and", "behind", "for", "at"})


def _with_article(name: str) -> str:
    words = name.split()
    # The head noun ends the phrase before the first preposition: "woman with bunny ears".
    head = next((i for i, word in enumerate(words) if word in _PREPOSITIONS and i > 0), len(words))
    head_word = words[head - 1]
    # Plural names ("two hearts", "jeans", "busts in silhouette") read better without an article.
    if head_word.endswith("s") and not head_word.endswith(("ss", "us", "is")):
        return name
    vowel = name[0] in "aeiou"
    if name.startswith(_A_PREFIXES):
        vowel = False
    elif name.startswith(_AN_PREFIXES):
        vowel = True
    return ("an " if vowel else "a ") + name


def scene_caption(names: Sequence[str]) -> str:
    """Caption a scene from the names of its glyphs, left to right.

    One glyph gives its name unchanged ("grinning face"); more give a list with heuristic
    English articles ("a grinning face and a red apple", "a cat, an eye and two hearts").

    Raises:
        ValueError: ``names`` is empty.
    """
    if not names:
        raise ValueError("a scene needs at least one glyph")
    if len(names) == 1:
        return names[0]
    parts = [_with_article(name) for name in names]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


@dataclass(frozen=True)
class AugmentConfig:
    """How scenes vary from item to item.

    Attributes:
        position_jitter: largest shift of a glyph's centre, as a fraction of the image side.
        scale_range: glyph cell side as a fraction of its slot (the image, or ``1/k`` of its
            width in a ``k``-glyph scene), drawn uniformly from ``[low, high]``.
        rotation_degrees: rotations are uniform in ``[-rotation_degrees, rotation_degrees]``.
            There is no flipping: a mirrored arrow or letter no longer matches its name.
        backgrounds: background kinds (of :data:`BACKGROUND_KINDS`) drawn uniformly per item:
            ``"white"``, ``"solid"`` (random colour), ``"gradient"`` (two random colours, random
            direction), ``"noise"`` (random colour with smooth blotches and grain).
        max_glyphs_per_scene: scenes hold ``1..max_glyphs_per_scene`` glyphs (uniform), side by
            side and captioned left to right.
    """

    position_jitter: float = 0.08
    scale_range: tuple[float, float] = (0.65, 0.95)
    rotation_degrees: float = 15.0
    backgrounds: tuple[str, ...] = ("solid", "gradient", "noise")
    max_glyphs_per_scene: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.position_jitter <= 0.5:
            raise ValueError(f"position_jitter must be in [0, 0.5], got {self.position_jitter}")
        low, high = self.scale_range
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"scale_range must satisfy 0 < low <= high <= 1, got {self.scale_range}")
        if not 0.0 <= self.rotation_degrees <= 180.0:
            raise ValueError(f"rotation_degrees must be in [0, 180], got {self.rotation_degrees}")
        unknown = [kind for kind in self.backgrounds if kind not in BACKGROUND_KINDS]
        if not self.backgrounds or unknown:
            raise ValueError(f"backgrounds must be a non-empty tuple of {BACKGROUND_KINDS}, got {self.backgrounds}")
        if not (isinstance(self.max_glyphs_per_scene, int) and self.max_glyphs_per_scene >= 1):
            raise ValueError(f"max_glyphs_per_scene must be an int >= 1, got {self.max_glyphs_per_scene}")

    @classmethod
    def none(cls, backgrounds: tuple[str, ...] = ("white",)) -> AugmentConfig:
        """No geometric variation: one centred glyph at 80 % of the image, on ``backgrounds``."""
        return cls(
            position_jitter=0.0,
            scale_range=(0.8, 0.8),
            rotation_degrees=0.0,
            backgrounds=backgrounds,
        )


class EmojiDataset(Dataset):
    """Emoji scenes with class labels and captions, rendered on the fly and deterministic.

    Item ``i`` depends only on ``(seed, i)`` and the configuration (its random numbers come from
    ``np.random.default_rng([seed, i])``), so any worker process and any epoch sees the same
    image.  The main glyph of item ``i`` is class ``i % num_classes``, so classes are balanced.

    Args:
        image_size: side of the square images in pixels (≥ 8; 32, 64 and 128 are typical).
        num_samples: dataset length.
        seed: non-negative int; different seeds give different scenes.
        classes: which glyphs are classes, in label order: ``None`` for the whole catalogue
            (code-point order), a list of emoji characters or Unicode names, or an int ``n`` for
            the first ``n`` of a fixed order of visually distinct glyphs
            (:func:`select_distinct_glyphs`).
        augment: scene variation; ``None`` is ``AugmentConfig()``, ``AugmentConfig.none()``
            turns it off.
        font_path: the font file; ``None`` uses :func:`~mmspec.data.emoji_glyphs.find_emoji_font`.
        return_pil: give ``image`` as a PIL RGB image instead of a tensor.

    Each item is a dict: ``image`` (float tensor ``[3, H, W]`` in ``[0, 1]``, or PIL image),
    ``label`` (int, class of the main glyph), ``caption`` (str), ``chars`` (str: the scene's
    glyphs left to right, one code point each, main glyph first; a string rather than a list so
    the default DataLoader collate works when scenes hold different numbers of glyphs).

    Raises:
        FileNotFoundError: the font is missing.
        ValueError: bad argument (the message says which and why).
    """

    def __init__(
        self,
        image_size: int = 32,
        num_samples: int = 10_000,
        seed: int = 0,
        classes: int | Sequence[str] | None = None,
        augment: AugmentConfig | None = None,
        font_path: str | os.PathLike[str] | None = None,
        return_pil: bool = False,
    ) -> None:
        if not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.image_size = image_size
        self.num_samples = num_samples
        self.seed = seed
        self.augment = AugmentConfig() if augment is None else augment
        self.return_pil = return_pil
        self._atlas = load_glyph_atlas(font_path)
        self._ids = self._resolve_classes(classes)
        self._glyphs = tuple(self._atlas.glyphs[i] for i in self._ids)
        # For small images each glyph is shrunk once, to twice the largest size a scene can ask
        # for, so items resample a small image instead of the 128 px cell.  Larger images use the
        # atlas directly: their copies would cost nearly as much memory as the atlas itself.
        base_size = 2 * math.ceil(self.augment.scale_range[1] * image_size)
        self._base_size = base_size if base_size <= GLYPH_SIZE // 2 else None
        self._base_cache: dict[int, Image.Image] = {}

    def _resolve_classes(self, classes: int | Sequence[str] | None) -> list[int]:
        if classes is None:
            return list(range(len(self._atlas.glyphs)))
        if isinstance(classes, (bool, str)) or not isinstance(classes, (int, Sequence)):
            raise ValueError(f"classes must be None, an int or a list of emoji characters/names, got {classes!r}")
        if isinstance(classes, int):
            return select_distinct_glyphs(self._atlas, classes)
        ids = [self._atlas.index(key) for key in classes]
        if not ids:
            raise ValueError("classes is empty")
        if len(set(ids)) != len(ids):
            raise ValueError(f"classes names the same glyph twice: {list(classes)}")
        return ids

    @property
    def glyphs(self) -> tuple[Glyph, ...]:
        """The class glyphs, in label order."""
        return self._glyphs

    @property
    def class_names(self) -> list[str]:
        """Caption text of each class, in label order."""
        return [glyph.name for glyph in self._glyphs]

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self._ids)

    def caption_for(self, glyphs: Sequence[int | str]) -> str:
        """Caption of a scene holding ``glyphs`` left to right.

        Args:
            glyphs: class labels of this dataset, or emoji characters (a ``chars`` string works).
        """
        names = []
        for glyph in glyphs:
            if isinstance(glyph, str):
                names.append(self._atlas.glyphs[self._atlas.index(glyph)].name)
            else:
                names.append(self._glyphs[glyph].name)
        return scene_caption(names)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, object]:
        index = operator.index(index)
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, index])
        label = index % self.num_classes
        pixels = self._background(rng)
        most = min(self.augment.max_glyphs_per_scene, self.num_classes)
        count = int(rng.integers(1, most + 1))
        # Other glyphs are distinct from the main one and from each other.
        others = rng.choice(self.num_classes - 1, size=count - 1, replace=False)
        labels = [label] + [int(o) + (o >= label) for o in others]
        for slot, class_label in enumerate(labels):
            self._draw_glyph(pixels, rng, class_label, slot, count)
        image = np.rint(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)
        chars = "".join(self._glyphs[c].char for c in labels)
        if self.return_pil:
            out_image: object = Image.fromarray(image, "RGB")
        else:
            # Converted in numpy: torch would spread this small op over its intra-op threads,
            # which costs more than it saves inside DataLoader workers.
            chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
            out_image = torch.from_numpy(chw / np.float32(255.0))
        caption = self.caption_for(labels)
        return {"image": out_image, "label": label, "caption": caption, "chars": chars}

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        kinds = self.augment.backgrounds
        kind = kinds[int(rng.integers(len(kinds)))]
        size = self.image_size
        color = rng.uniform(0.0, 1.0, 3).astype(np.float32)
        if kind == "white":
            return np.ones((size, size, 3), np.float32)
        if kind == "solid":
            return np.broadcast_to(color, (size, size, 3)).copy()
        if kind == "gradient":
            other = rng.uniform(0.0, 1.0, 3).astype(np.float32)
            angle = rng.uniform(0.0, 2.0 * math.pi)
            coords = np.linspace(-0.5, 0.5, size, dtype=np.float32)
            t = coords[None, :] * math.cos(angle) + coords[:, None] * math.sin(angle)
            t = (t - t.min()) / (t.max() - t.min())
            return color + t[..., None] * (other - color)
        # noise: blotches from a coarse random grid upsampled smoothly, plus fine grain.
        coarse = max(3, size // 16)
        blotches = color + rng.normal(0.0, 0.15, (coarse, coarse, 3))
        blotch_u8 = np.rint(np.clip(blotches, 0.0, 1.0) * 255.0).astype(np.uint8)
        blotch_img = Image.fromarray(blotch_u8, "RGB")
        smooth = np.asarray(blotch_img.resize((size, size), Image.BICUBIC), np.float32) / 255.0
        return smooth + rng.normal(0.0, 0.03, (size, size, 3)).astype(np.float32)

    def _glyph_base(self, label: int) -> Image.Image:
        if self._base_size is None:
            return Image.fromarray(self._atlas.images[self._ids[label]], "RGBa")
        base = self._base_cache.get(label)
        if base is None:
            base = Image.fromarray(self._atlas.images[self._ids[label]], "RGBa")
            base = base.resize((self._base_size, self._base_size), Image.LANCZOS)
            self._base_cache[label] = base
        return base

    def _draw_glyph(self, pixels: np.ndarray, rng: np.random.Generator, label: int, slot: int, count: int) -> None:
        aug = self.augment
        size = self.image_size
        slot_width = size / count
        side = max(1, round(rng.uniform(*aug.scale_range) * slot_width))
        angle = rng.uniform(-aug.rotation_degrees, aug.rotation_degrees)
        shift_x, shift_y = rng.uniform(-1.0, 1.0, 2) * aug.position_jitter * size
        patch = _transform_glyph(self._glyph_base(label), side, angle)
        height, width = patch.shape[:2]
        centre_x = slot_width * (slot + 0.5) + shift_x
        centre_y = size / 2 + shift_y
        # Keep the whole glyph in frame when it fits, so the caption stays true.
        left = int(np.clip(round(centre_x - width / 2), 0, max(0, size - width)))
        top = int(np.clip(round(centre_y - height / 2), 0, max(0, size - height)))
        _composite(pixels, patch, left, top)


def _transform_glyph(img: Image.Image, side: int, angle: float) -> np.ndarray:
    """Resize a premultiplied (``"RGBa"``) glyph cell to ``side`` px and rotate it; float RGBa."""
    if angle == 0.0:
        img = img.resize((side, side), Image.LANCZOS)
    else:
        # Rotating at twice the final size, then shrinking, keeps edges sharp even with the
        # cheap bilinear filter; rotating the full cell would cost several times more.
        work = min(img.width, 2 * side)
        if work != img.width:
            img = img.resize((work, work), Image.LANCZOS)
        img = img.rotate(angle, Image.BILINEAR, expand=True)
        scale = side / work
        shape = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(shape, Image.LANCZOS)
    return np.asarray(img, np.float32) / 255.0


def _composite(pixels: np.ndarray, patch: np.ndarray, left: int, top: int) -> None:
    """Alpha-composite premultiplied ``patch`` onto ``pixels`` in place, clipped to the frame."""
    size_y, size_x = pixels.shape[:2]
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + patch.shape[0], size_y), min(left + patch.shape[1], size_x)
    if y1 <= y0 or x1 <= x0:
        return
    part = patch[y0 - top : y1 - top, x0 - left : x1 - left]
    region = pixels[y0:y1, x0:x1]
    region *= 1.0 - part[..., 3:]
    region += part[..., :3]
