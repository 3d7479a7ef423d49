"""Offline datasets: emoji image–caption / class-label scenes rendered from a system font."""

from .emoji import (
    BACKGROUND_KINDS,
    FONT_ENV_VAR,
    GLYPH_SIZE,
    GROUPS,
    AugmentConfig,
    EmojiDataset,
    Glyph,
    GlyphAtlas,
    bundled_photos,
    emoji_group,
    find_emoji_font,
    load_glyph_atlas,
    make_grid_preview,
    scene_caption,
    select_distinct_glyphs,
)

__all__ = [
    "BACKGROUND_KINDS",
    "FONT_ENV_VAR",
    "GLYPH_SIZE",
    "GROUPS",
    "AugmentConfig",
    "EmojiDataset",
    "Glyph",
    "GlyphAtlas",
    "bundled_photos",
    "emoji_group",
    "find_emoji_font",
    "load_glyph_atlas",
    "make_grid_preview",
    "scene_caption",
    "select_distinct_glyphs",
]
