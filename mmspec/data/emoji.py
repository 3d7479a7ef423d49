"""Image–caption / class-label dataset rendered offline from the Noto Color Emoji font.

Every single-code-point emoji that the font draws becomes one class.  Its caption text is the
lower-cased Unicode character name (``unicodedata.name(ch).lower()``, e.g. "grinning face",
"red apple") and it belongs to one coarse group of :data:`GROUPS`.  :class:`EmojiDataset` draws
scenes of one to a few glyphs on random backgrounds, deterministically in ``(seed, index)``, to
train small reference models (VQ tokenizer + class-conditional GPT, captioning VLM) on a CPU
without downloading anything.

Font.  Debian/Ubuntu: ``apt-get install fonts-noto-color-emoji``.  The font is a colour bitmap
(CBDT) font with a single strike, so it is only rendered at size 109 (≈136×128 px per glyph);
smaller images are made by resampling that bitmap.

Catalogue.  A code point is a class when the font has a non-empty glyph for it on its own and it
has a name in Unicode 14.0.  Left out: combining marks and format characters (keycap combiner,
zero-width joiner, tag characters), skin-tone modifiers and hair components (they only make sense
inside sequences), private-use glyphs, and emoji added after Unicode 14.0: Python 3.11 ships
Unicode 14.0 and newer Pythons know newer names, and the class list must not change with the
interpreter.  Python 3.10 (Unicode 13.0) lacks the names of the 14.0 additions and so yields a
shorter catalogue.  With Debian 12's font (2.042) and Python 3.11 the catalogue has 1,383
glyphs.  Multi-code-point emoji (flags of countries, ZWJ families, keycaps) are not classes.

Groups (a coarse, hand-made reading of the code charts, close to the Unicode emoji groups; see
``_GROUP_RANGES``; anything not listed there is a symbol):

- ``"smileys & people"``: faces, hands, body parts, persons, fantasy beings (U+1F600–1F64F,
  most of U+1F910–1F937, U+1F970–1F97A, U+1F9CC–1F9E0, U+1FAC0–1FAC5, U+1FAE0–1FAF6,
  people in U+1F440–1F487).
- ``"animals & nature"``: animals (U+1F400–1F43F, U+1F980–1F9AE, U+1FAB0–1FABA), plants.
- ``"food & drink"``: U+1F345–1F37F, U+1F950–1F96F, U+1F9C0–1F9CB, U+1FAD0–1FAD9, ☕, …
- ``"travel & places"``: buildings, landscapes, vehicles (U+1F680–1F6A8), sky and weather
  (U+1F300–1F32C, ☀☁☂⛄), clock faces.
- ``"activities"``: events, sports, games, music and the arts (most of U+1F380–1F3D3,
  U+1F945–1F94F, U+1FA80–1FA86, ⚽⚾).
- ``"objects"``: clothing, tools, office, household, medical, money (U+1F4B0–1F4FF,
  U+1F9EA–1F9FF, most of U+1FA70–1FAAC).
- ``"symbols"``: hearts, arrows, signs, zodiac, geometric shapes, squared letters, regional
  indicator letters.
- ``"flags"``: the single-code-point flags (🏁 🏳 🏴 🚩 🎌).
"""

from __future__ import annotations

import bisect
import functools
import math
import operator
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

FONT_ENV_VAR = "MMSPEC_EMOJI_FONT"
INSTALL_HINT = "apt-get install fonts-noto-color-emoji"
# Debian/Ubuntu first (the supported setup), then where Arch and Fedora put the same file.
DEFAULT_FONT_PATHS = (
    Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"),
    Path("/usr/share/fonts/noto/NotoColorEmoji.ttf"),
    Path("/usr/share/fonts/google-noto-color-emoji/NotoColorEmoji.ttf"),
)

# The CBDT font has one bitmap strike; FreeType refuses any other size for it.
_FONT_SIZE = 109
# Side of an atlas cell: the largest glyph's ink box at size 109 is exactly 128×128.
GLYPH_SIZE = 128

GROUPS = (
    "smileys & people",
    "animals & nature",
    "food & drink",
    "travel & places",
    "activities",
    "objects",
    "symbols",
    "flags",
)
_PEOPLE, _NATURE, _FOOD, _TRAVEL, _ACTIVITIES, _OBJECTS, _SYMBOLS, _FLAGS = GROUPS

# (first, last, group), sorted and disjoint; code points not covered are symbols.
_GROUP_RANGES: tuple[tuple[int, int, str], ...] = (
    (0x231A, 0x231B, _OBJECTS),
    (0x2328, 0x2328, _OBJECTS),
    (0x23F0, 0x23F3, _OBJECTS),
    (0x2600, 0x2604, _TRAVEL),
    (0x260E, 0x260E, _OBJECTS),
    (0x2614, 0x2614, _TRAVEL),
    (0x2615, 0x2615, _FOOD),
    (0x2618, 0x2618, _NATURE),
    (0x261D, 0x261D, _PEOPLE),
    (0x2620, 0x2620, _PEOPLE),
    (0x2639, 0x263A, _PEOPLE),
    (0x265F, 0x2666, _ACTIVITIES),
    (0x2692, 0x2692, _OBJECTS),
    (0x2693, 0x2693, _TRAVEL),
    (0x2694, 0x2694, _OBJECTS),
    (0x2696, 0x2697, _OBJECTS),
    (0x2699, 0x2699, _OBJECTS),
    (0x26B0, 0x26B1, _OBJECTS),
    (0x26BD, 0x26BE, _ACTIVITIES),
    (0x26C4, 0x26C8, _TRAVEL),
    (0x26CF, 0x26D3, _OBJECTS),
    (0x26E9, 0x26F2, _TRAVEL),
    (0x26F3, 0x26F3, _ACTIVITIES),
    (0x26F4, 0x26F5, _TRAVEL),
    (0x26F7, 0x26F9, _ACTIVITIES),
    (0x26FA, 0x26FD, _TRAVEL),
    (0x2702, 0x2702, _OBJECTS),
    (0x2708, 0x2708, _TRAVEL),
    (0x2709, 0x2709, _OBJECTS),
    (0x270A, 0x270D, _PEOPLE),
    (0x270F, 0x2712, _OBJECTS),
    (0x2744, 0x2744, _TRAVEL),
    (0x1F004, 0x1F004, _ACTIVITIES),
    (0x1F0CF, 0x1F0CF, _ACTIVITIES),
    (0x1F300, 0x1F32C, _TRAVEL),
    (0x1F32D, 0x1F330, _FOOD),
    (0x1F331, 0x1F335, _NATURE),
    (0x1F336, 0x1F336, _FOOD),
    (0x1F337, 0x1F344, _NATURE),
    (0x1F345, 0x1F37F, _FOOD),
    (0x1F380, 0x1F381, _ACTIVITIES),
    (0x1F382, 0x1F382, _FOOD),
    (0x1F383, 0x1F384, _ACTIVITIES),
    (0x1F385, 0x1F385, _PEOPLE),
    (0x1F386, 0x1F38B, _ACTIVITIES),
    (0x1F38C, 0x1F38C, _FLAGS),
    (0x1F38D, 0x1F391, _ACTIVITIES),
    (0x1F392, 0x1F393, _OBJECTS),
    (0x1F396, 0x1F397, _ACTIVITIES),
    (0x1F399, 0x1F39E, _OBJECTS),
    (0x1F39F, 0x1F3C0, _ACTIVITIES),
    (0x1F3C1, 0x1F3C1, _FLAGS),
    (0x1F3C2, 0x1F3D3, _ACTIVITIES),
    (0x1F3D4, 0x1F3ED, _TRAVEL),
    (0x1F3EE, 0x1F3EE, _OBJECTS),
    (0x1F3EF, 0x1F3F0, _TRAVEL),
    (0x1F3F3, 0x1F3F4, _FLAGS),
    (0x1F3F5, 0x1F3F7, _OBJECTS),
    (0x1F3F8, 0x1F3F9, _ACTIVITIES),
    (0x1F3FA, 0x1F3FA, _OBJECTS),
    (0x1F400, 0x1F43F, _NATURE),
    (0x1F440, 0x1F450, _PEOPLE),
    (0x1F451, 0x1F462, _OBJECTS),
    (0x1F463, 0x1F483, _PEOPLE),
    (0x1F484, 0x1F485, _OBJECTS),
    (0x1F486, 0x1F487, _PEOPLE),
    (0x1F488, 0x1F488, _TRAVEL),
    (0x1F489, 0x1F48A, _OBJECTS),
    (0x1F48D, 0x1F48E, _OBJECTS),
    (0x1F48F, 0x1F48F, _PEOPLE),
    (0x1F490, 0x1F490, _NATURE),
    (0x1F491, 0x1F491, _PEOPLE),
    (0x1F492, 0x1F492, _TRAVEL),
    (0x1F4A1, 0x1F4A1, _OBJECTS),
    (0x1F4A3, 0x1F4A3, _OBJECTS),
    (0x1F4A9, 0x1F4AA, _PEOPLE),
    (0x1F4AE, 0x1F4AE, _NATURE),
    (0x1F4B0, 0x1F4F2, _OBJECTS),
    (0x1F4F7, 0x1F4FF, _OBJECTS),
    (0x1F507, 0x1F517, _OBJECTS),
    (0x1F525, 0x1F525, _TRAVEL),
    (0x1F526, 0x1F52E, _OBJECTS),
    (0x1F54A, 0x1F54A, _NATURE),
    (0x1F54B, 0x1F54D, _TRAVEL),
    (0x1F550, 0x1F567, _TRAVEL),
    (0x1F56F, 0x1F573, _OBJECTS),
    (0x1F574, 0x1F575, _PEOPLE),
    (0x1F576, 0x1F576, _OBJECTS),
    (0x1F577, 0x1F578, _NATURE),
    (0x1F579, 0x1F579, _ACTIVITIES),
    (0x1F57A, 0x1F57A, _PEOPLE),
    (0x1F587, 0x1F58D, _OBJECTS),
    (0x1F590, 0x1F596, _PEOPLE),
    (0x1F5A5, 0x1F5E1, _OBJECTS),
    (0x1F5E3, 0x1F5E3, _PEOPLE),
    (0x1F5F3, 0x1F5F3, _OBJECTS),
    (0x1F5FA, 0x1F5FF, _TRAVEL),
    (0x1F600, 0x1F64F, _PEOPLE),
    (0x1F680, 0x1F6A8, _TRAVEL),
    (0x1F6A9, 0x1F6A9, _FLAGS),
    (0x1F6AA, 0x1F6AA, _OBJECTS),
    (0x1F6B2, 0x1F6B2, _TRAVEL),
    (0x1F6B4, 0x1F6B5, _ACTIVITIES),
    (0x1F6B6, 0x1F6B6, _PEOPLE),
    (0x1F6BD, 0x1F6C1, _OBJECTS),
    (0x1F6CB, 0x1F6CF, _OBJECTS),
    (0x1F6D1, 0x1F6D1, _TRAVEL),
    (0x1F6D2, 0x1F6D2, _OBJECTS),
    (0x1F6D5, 0x1F6D6, _TRAVEL),
    (0x1F6D7, 0x1F6D7, _OBJECTS),
    (0x1F6DD, 0x1F6DF, _TRAVEL),
    (0x1F6E0, 0x1F6E1, _OBJECTS),
    (0x1F6E2, 0x1F6F6, _TRAVEL),
    (0x1F6F7, 0x1F6F7, _ACTIVITIES),
    (0x1F6F8, 0x1F6FC, _TRAVEL),
    (0x1F90C, 0x1F90C, _PEOPLE),
    (0x1F90F, 0x1F937, _PEOPLE),
    (0x1F938, 0x1F93F, _ACTIVITIES),
    (0x1F940, 0x1F940, _NATURE),
    (0x1F941, 0x1F941, _OBJECTS),
    (0x1F942, 0x1F944, _FOOD),
    (0x1F945, 0x1F94F, _ACTIVITIES),
    (0x1F950, 0x1F96F, _FOOD),
    (0x1F970, 0x1F97A, _PEOPLE),
    (0x1F97B, 0x1F97F, _OBJECTS),
    (0x1F980, 0x1F9AE, _NATURE),
    (0x1F9AF, 0x1F9AF, _OBJECTS),
    (0x1F9B4, 0x1F9B9, _PEOPLE),
    (0x1F9BA, 0x1F9BA, _OBJECTS),
    (0x1F9BB, 0x1F9BB, _PEOPLE),
    (0x1F9BC, 0x1F9BD, _TRAVEL),
    (0x1F9BE, 0x1F9BF, _PEOPLE),
    (0x1F9C0, 0x1F9CB, _FOOD),
    (0x1F9CC, 0x1F9E0, _PEOPLE),
    (0x1F9E2, 0x1F9E6, _OBJECTS),
    (0x1F9E7, 0x1F9E9, _ACTIVITIES),
    (0x1F9EA, 0x1F9FF, _OBJECTS),
    (0x1FA70, 0x1FA7C, _OBJECTS),
    (0x1FA80, 0x1FA86, _ACTIVITIES),
    (0x1FA90, 0x1FA90, _TRAVEL),
    (0x1FA91, 0x1FAA7, _OBJECTS),
    (0x1FAA8, 0x1FAA8, _TRAVEL),
    (0x1FAA9, 0x1FAA9, _ACTIVITIES),
    (0x1FAAA, 0x1FAAC, _OBJECTS),
    (0x1FAB0, 0x1FABA, _NATURE),
    (0x1FAC0, 0x1FAC5, _PEOPLE),
    (0x1FAD0, 0x1FAD9, _FOOD),
    (0x1FAE0, 0x1FAE6, _PEOPLE),
    (0x1FAF0, 0x1FAF6, _PEOPLE),
)
_GROUP_STARTS = [first for first, _, _ in _GROUP_RANGES]

# Blocks that hold every single-code-point emoji.  Probing them with the font replaces a cmap
# parser (fontTools is not a dependency); it finds the same set and costs a fraction of a second.
_CANDIDATE_CODEPOINTS = (
    0x00A9,
    0x00AE,
    *range(0x2000, 0x2C00),
    *range(0x3000, 0x3040),
    *range(0x3200, 0x3300),
    *range(0x1F000, 0x1FB00),
)
# Emoji added in Unicode 15.0 and 16.0.  Excluded so the class list does not depend on which
# Unicode version the running Python's unicodedata knows (3.11: 14.0, 3.12: 15.0, 3.14: 16.0).
_AFTER_UNICODE_14 = frozenset(
    {
        0x1F6DC, 0x1FA75, 0x1FA76, 0x1FA77, 0x1FA87, 0x1FA88, 0x1FAAD, 0x1FAAE, 0x1FAAF, 0x1FABB,
        0x1FABC, 0x1FABD, 0x1FABF, 0x1FACE, 0x1FACF, 0x1FADA, 0x1FADB, 0x1FAE8, 0x1FAF7, 0x1FAF8,
        0x1FA89, 0x1FA8F, 0x1FABE, 0x1FAC6, 0x1FADC, 0x1FADF, 0x1FAE9,
    }
)  # fmt: skip

# Rendered first when choosing visually distinct classes, so ``classes=1`` is a smiley.
_FIRST_DISTINCT = "\U0001F600"

BACKGROUND_KINDS = ("white", "solid", "gradient", "noise")


def emoji_group(char: str) -> str:
    """Return the coarse group (one of :data:`GROUPS`) of a single-code-point emoji."""
    codepoint = ord(char)
    pos = bisect.bisect_right(_GROUP_STARTS, codepoint) - 1
    if pos >= 0:
        first, last, group = _GROUP_RANGES[pos]
        if first <= codepoint <= last:
            return group
    return _SYMBOLS


def find_emoji_font(font_path: str | os.PathLike[str] | None = None) -> Path:
    """Locate ``NotoColorEmoji.ttf``.

    Args:
        font_path: explicit font file; takes precedence over everything else.

    Returns:
        The path of the font: ``font_path``, else ``$MMSPEC_EMOJI_FONT``, else the first of
        :data:`DEFAULT_FONT_PATHS` that exists.

    Raises:
        FileNotFoundError: the font is not there; the message says how to install it.
    """
    if font_path is not None:
        candidates, source = [Path(font_path)], "font_path"
    elif os.environ.get(FONT_ENV_VAR):
        candidates, source = [Path(os.environ[FONT_ENV_VAR])], f"${FONT_ENV_VAR}"
    else:
        candidates, source = list(DEFAULT_FONT_PATHS), "the default locations"
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"Noto Color Emoji font not found (looked in {source}: {tried}). Install it with "
        f"`{INSTALL_HINT}` (Debian/Ubuntu, as root), or pass font_path= / set {FONT_ENV_VAR} "
        "to a NotoColorEmoji.ttf file."
    )


@dataclass(frozen=True)
class Glyph:
    """One emoji class: the character, its caption text and its coarse group."""

    char: str
    name: str
    group: str

    @property
    def codepoint(self) -> int:
        """The Unicode code point of :attr:`char`."""
        return ord(self.char)


@dataclass(frozen=True, eq=False)  # identity hash: the ndarray field is unhashable
class GlyphAtlas:
    """Every catalogued glyph rendered once.

    Attributes:
        glyphs: the catalogue, in code-point order.
        images: uint8 array ``[len(glyphs), GLYPH_SIZE, GLYPH_SIZE, 4]`` of *premultiplied* RGBA
            (PIL mode ``"RGBa"``), each glyph centred in its cell at its natural size.
            Premultiplied so that resampling does not bleed the colour of transparent pixels
            into the edges.  Read-only: the atlas is shared by every dataset in the process.
        font_path: the font it was rendered from.
    """

    glyphs: tuple[Glyph, ...]
    images: np.ndarray
    font_path: Path

    def index(self, key: str) -> int:
        """Return the atlas index of a glyph given as its character or (case-insensitive) name.

        Raises:
            ValueError: no catalogued glyph has that character or name.
        """
        found = self._lookup.get(key, self._lookup.get(key.strip().lower()))
        if found is None:
            raise ValueError(
                f"unknown emoji class {key!r}: give a single-code-point emoji character or its "
                "lower-case Unicode name (e.g. 'grinning face'); the catalogue is "
                "load_glyph_atlas().glyphs"
            )
        return found

    @functools.cached_property
    def _lookup(self) -> dict[str, int]:
        lookup: dict[str, int] = {}
        for i, glyph in enumerate(self.glyphs):
            lookup[glyph.char] = i
            lookup[glyph.name] = i
        return lookup


def _is_catalogued(codepoint: int) -> bool:
    char = chr(codepoint)
    name = unicodedata.name(char, "")
    category = unicodedata.category(char)
    return (
        bool(name)
        and codepoint not in _AFTER_UNICODE_14
        # Mn/Me/Cf/Co: keycap combiner, joiners, private use; Sk: skin-tone modifiers.
        and category[0] not in "MC"
        and category != "Sk"
        and not name.startswith("EMOJI COMPONENT")
    )


def load_glyph_atlas(font_path: str | os.PathLike[str] | None = None) -> GlyphAtlas:
    """Render every catalogued glyph of the font once (about a second), cached for the process.

    Args:
        font_path: the font file; ``None`` looks it up with :func:`find_emoji_font`.

    Raises:
        FileNotFoundError: the font is missing (the message names the package to install).
    """
    path = find_emoji_font(font_path).resolve()
    stat = path.stat()
    # The size and mtime in the key make a replaced font file re-render.
    return _render_atlas(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _render_atlas(path: str, size: int, mtime_ns: int) -> GlyphAtlas:
    del size, mtime_ns  # cache key only
    # BASIC layout: single code points need no shaping, and raqm fails on some candidates.
    font = ImageFont.truetype(path, _FONT_SIZE, layout_engine=ImageFont.Layout.BASIC)
    glyphs: list[Glyph] = []
    cells: list[np.ndarray] = []
    for codepoint in _CANDIDATE_CODEPOINTS:
        if not _is_catalogued(codepoint):
            continue
        char = chr(codepoint)
        left, top, right, bottom = font.getbbox(char)
        if bottom <= top or right <= left:  # not in the font: .notdef is empty here
            continue
        canvas = Image.new("RGBA", (right, bottom), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((0, 0), char, font=font, embedded_color=True)
        ink = canvas.getchannel("A").getbbox()
        if ink is None:
            continue
        glyph_img = canvas.crop(ink)
        cell = Image.new("RGBA", (GLYPH_SIZE, GLYPH_SIZE), (0, 0, 0, 0))
        offset = ((GLYPH_SIZE - glyph_img.width) // 2, (GLYPH_SIZE - glyph_img.height) // 2)
        cell.paste(glyph_img, offset)
        cells.append(np.asarray(cell.convert("RGBa")))
        glyphs.append(Glyph(char, unicodedata.name(char).lower(), emoji_group(char)))
    if not glyphs:
        raise ValueError(f"{path} has no colour emoji glyphs; is it NotoColorEmoji.ttf?")
    images = np.stack(cells)
    images.flags.writeable = False
    return GlyphAtlas(tuple(glyphs), images, Path(path))


def select_distinct_glyphs(atlas: GlyphAtlas, n: int) -> list[int]:
    """Pick ``n`` visually distinct glyphs, deterministically.

    Greedy farthest-point sampling on 16×16 thumbnails (composited on grey), starting from the
    grinning face, so the first choices spread over colours and shapes and every prefix of the
    order is itself spread out.

    Returns:
        Atlas indices, in selection order.

    Raises:
        ValueError: ``n`` is not in ``1..len(atlas.glyphs)``.
    """
    total = len(atlas.glyphs)
    if not 1 <= n <= total:
        raise ValueError(f"classes={n}: the font has {total} emoji classes, ask for 1..{total}")
    return list(_distinct_order(atlas)[:n])


@functools.lru_cache(maxsize=2)
def _distinct_order(atlas: GlyphAtlas) -> tuple[int, ...]:
    # Integer features make every distance exact in float64 (sums stay far below 2**53), so the
    # order, ties included, is the same on every machine and BLAS.
    block = GLYPH_SIZE // 16
    chunks = []
    for first in range(0, len(atlas.images), 64):  # chunks bound the int32 temporaries
        images = atlas.images[first : first + 64].astype(np.int32)
        on_grey = images[..., :3] + (128 * (255 - images[..., 3:])) // 255
        sums = on_grey.reshape(len(images), 16, block, 16, block, 3).sum(axis=(2, 4))
        chunks.append((sums // (block * block)).reshape(len(images), -1))
    features = np.concatenate(chunks).astype(np.float64)
    squared = (features * features).sum(axis=1)
    gram = features @ features.T
    try:
        start = atlas.index(_FIRST_DISTINCT)
    except ValueError:  # a font without it still gets a deterministic start
        start = 0
    order = [start]
    nearest = squared + squared[start] - 2.0 * gram[start]
    for _ in range(len(features) - 1):
        nearest[order[-1]] = -1.0  # never re-pick
        pick = int(np.argmax(nearest))  # argmax breaks ties by lowest index
        order.append(pick)
        nearest = np.minimum(nearest, squared + squared[pick] - 2.0 * gram[pick])
    return tuple(order)


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
            raise ValueError(
                f"scale_range must satisfy 0 < low <= high <= 1, got {self.scale_range}"
            )
        if not 0.0 <= self.rotation_degrees <= 180.0:
            raise ValueError(f"rotation_degrees must be in [0, 180], got {self.rotation_degrees}")
        unknown = [kind for kind in self.backgrounds if kind not in BACKGROUND_KINDS]
        if not self.backgrounds or unknown:
            raise ValueError(
                f"backgrounds must be a non-empty tuple of {BACKGROUND_KINDS}, "
                f"got {self.backgrounds}"
            )
        if not (isinstance(self.max_glyphs_per_scene, int) and self.max_glyphs_per_scene >= 1):
            raise ValueError(
                f"max_glyphs_per_scene must be an int >= 1, got {self.max_glyphs_per_scene}"
            )

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
        font_path: the font file; ``None`` uses :func:`find_emoji_font`.
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
            raise ValueError(
                f"classes must be None, an int or a list of emoji characters/names, got {classes!r}"
            )
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

    def _draw_glyph(
        self, pixels: np.ndarray, rng: np.random.Generator, label: int, slot: int, count: int
    ) -> None:
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


def make_grid_preview(dataset: EmojiDataset, path: str | os.PathLike[str], n: int = 64) -> Path:
    """Write the first ``n`` images of ``dataset`` as a square-ish PNG grid.

    Args:
        dataset: the dataset to preview (its ``return_pil`` setting does not matter).
        path: the PNG file to write; parent folders are created.
        n: number of images (at most ``len(dataset)``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    n = min(n, len(dataset))
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    columns = math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    size, pad = dataset.image_size, 2
    grid_shape = (columns * (size + pad) + pad, rows * (size + pad) + pad)
    grid = Image.new("RGB", grid_shape, (255, 255, 255))
    for i in range(n):
        image = dataset[i]["image"]
        if isinstance(image, torch.Tensor):
            array = (image.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
            image = Image.fromarray(array, "RGB")
        row, col = divmod(i, columns)
        grid.paste(image, (pad + col * (size + pad), pad + row * (size + pad)))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


# skimage.data images that ship inside the wheel (the others download with pooch).
_SKIMAGE_PHOTOS = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "rocket",
    "text",
)


def bundled_photos() -> dict[str, Image.Image]:
    """Return scikit-image's bundled sample photos as RGB PIL images, keyed by name.

    Raises:
        ImportError: scikit-image is not installed (``pip install scikit-image``).
    """
    try:
        from skimage import data as skimage_data
    except ImportError as err:
        raise ImportError("bundled_photos() needs scikit-image: pip install scikit-image") from err
    return {
        name: Image.fromarray(getattr(skimage_data, name)()).convert("RGB")
        for name in _SKIMAGE_PHOTOS
    }
