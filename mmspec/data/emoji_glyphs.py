"""The emoji classes: the Noto Color Emoji font, the catalogue of single-code-point glyphs it draws
(rendered once into an atlas) and a choice of visually distinct classes (:mod:`mmspec.data.emoji`).

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
"""

from __future__ import annotations

import functools
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .emoji_groups import emoji_group

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
_FIRST_DISTINCT = "\U0001f600"


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
