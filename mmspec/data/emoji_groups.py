"""The coarse group of each emoji class (:mod:`mmspec.data.emoji`).

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


def emoji_group(char: str) -> str:
    """Return the coarse group (one of :data:`GROUPS`) of a single-code-point emoji."""
    codepoint = ord(char)
    pos = bisect.bisect_right(_GROUP_STARTS, codepoint) - 1
    if pos >= 0:
        first, last, group = _GROUP_RANGES[pos]
        if first <= codepoint <= last:
            return group
    return _SYMBOLS
