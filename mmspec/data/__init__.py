"""Offline datasets: emoji image–caption / class-label scenes rendered from a system font, and the
image lists given on the command line."""

from .emoji import BACKGROUND_KINDS, AugmentConfig, EmojiDataset, scene_caption
from .emoji_glyphs import (
    FONT_ENV_VAR,
    GLYPH_SIZE,
    Glyph,
    GlyphAtlas,
    find_emoji_font,
    load_glyph_atlas,
    select_distinct_glyphs,
)
from .emoji_groups import GROUPS, emoji_group

__all__ = [
    "BACKGROUND_KINDS",
    "FONT_ENV_VAR",
    "GLYPH_SIZE",
    "GROUPS",
    "AugmentConfig",
    "EmojiDataset",
    "Glyph",
    "GlyphAtlas",
    "emoji_group",
    "find_emoji_font",
    "load_glyph_atlas",
    "scene_caption",
    "select_distinct_glyphs",
]
