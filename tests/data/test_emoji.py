"""Tests for mmspec.data.emoji: the font-rendered emoji image–caption dataset."""

import unicodedata

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mmspec.data import (
    FONT_ENV_VAR,
    GROUPS,
    AugmentConfig,
    EmojiDataset,
    emoji_glyphs,
    emoji_group,
    emoji_groups,
    find_emoji_font,
    load_glyph_atlas,
    scene_caption,
    select_distinct_glyphs,
)

INSTALL_HINT = "fonts-noto-color-emoji"


@pytest.fixture(scope="module")
def atlas():
    """The rendered glyph atlas; skips the test when the font is not installed."""
    try:
        return load_glyph_atlas()
    except FileNotFoundError as err:
        pytest.skip(f"Noto Color Emoji font missing (apt-get install {INSTALL_HINT}): {err}")


def _same_class_pair(dataset):
    """Two indices whose main glyph is the same class."""
    return 3, 3 + dataset.num_classes


# --- font discovery -----------------------------------------------------------------------


def test_missing_font_path_raises_with_install_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match=INSTALL_HINT):
        EmojiDataset(font_path=tmp_path / "NotoColorEmoji.ttf")


def test_missing_font_env_var_and_defaults_raise(tmp_path, monkeypatch):
    monkeypatch.setenv(FONT_ENV_VAR, str(tmp_path / "nope.ttf"))
    with pytest.raises(FileNotFoundError, match=FONT_ENV_VAR):
        find_emoji_font()
    monkeypatch.delenv(FONT_ENV_VAR)
    monkeypatch.setattr(emoji_glyphs, "DEFAULT_FONT_PATHS", (tmp_path / "missing.ttf",))
    with pytest.raises(FileNotFoundError, match=INSTALL_HINT):
        find_emoji_font()


def test_explicit_font_path_wins_over_env_var(atlas, monkeypatch):
    monkeypatch.setenv(FONT_ENV_VAR, "/nonexistent/font.ttf")
    assert find_emoji_font(atlas.font_path) == atlas.font_path


# --- catalogue ----------------------------------------------------------------------------


def test_catalogue_names_groups_and_exclusions(atlas):
    glyphs = atlas.glyphs
    assert len(glyphs) > 1000
    assert len({g.char for g in glyphs}) == len(glyphs)
    assert [g.codepoint for g in glyphs] == sorted(g.codepoint for g in glyphs)
    for glyph in glyphs:
        assert len(glyph.char) == 1
        assert glyph.name == unicodedata.name(glyph.char).lower()
        assert glyph.group in GROUPS
    assert {g.group for g in glyphs} == set(GROUPS)
    chars = {g.char for g in glyphs}
    # Modifiers, components and combining marks only make sense inside sequences.
    for excluded in ("\U0001f3fb", "\U0001f9b0", "\u20e3", "\u200d"):
        assert excluded not in chars
    assert atlas.images.shape == (len(glyphs), emoji_glyphs.GLYPH_SIZE, emoji_glyphs.GLYPH_SIZE, 4)
    assert atlas.images.dtype == np.uint8
    # Every cell holds ink, and premultiplied colour never exceeds alpha.
    assert (atlas.images[..., 3].reshape(len(glyphs), -1).max(axis=1) > 0).all()
    assert (atlas.images[..., :3] <= atlas.images[..., 3:]).all()


def test_group_mapping_examples_and_table_is_sorted():
    expected = {
        "\U0001f600": "smileys & people",
        "\U0001f408": "animals & nature",
        "\U0001f34e": "food & drink",
        "\U0001f697": "travel & places",
        "\u26bd": "activities",
        "\U0001f511": "objects",
        "\u2764": "symbols",
        "\U0001f3c1": "flags",
    }
    for char, group in expected.items():
        assert emoji_group(char) == group, unicodedata.name(char)
    ranges = emoji_groups._GROUP_RANGES
    for (first, last, _), (next_first, _, _) in zip(ranges, ranges[1:]):
        assert first <= last < next_first


def test_distinct_selection_is_a_stable_prefix(atlas):
    first = select_distinct_glyphs(atlas, 10)
    assert first == select_distinct_glyphs(atlas, 40)[:10]
    assert len(set(first)) == 10
    assert atlas.glyphs[first[0]].char == "\U0001f600"


# --- items --------------------------------------------------------------------------------


def test_determinism_and_seeds(atlas):
    a = EmojiDataset(image_size=32, num_samples=50, seed=7)
    b = EmojiDataset(image_size=32, num_samples=50, seed=7)
    other = EmojiDataset(image_size=32, num_samples=50, seed=8)
    later_first = b[9]  # access order must not matter
    for i in (0, 9, 49):
        item = a[i]
        again = b[i]
        assert torch.equal(item["image"], again["image"])
        assert item["caption"] == again["caption"] and item["chars"] == again["chars"]
        assert not torch.equal(item["image"], other[i]["image"])
    assert torch.equal(later_first["image"], a[9]["image"])


@pytest.mark.parametrize("size", [8, 32, 64])
def test_shapes_and_range(atlas, size):
    dataset = EmojiDataset(image_size=size, num_samples=4)
    item = dataset[1]
    image = item["image"]
    assert image.shape == (3, size, size) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert isinstance(item["label"], int)
    pil = EmojiDataset(image_size=size, num_samples=4, return_pil=True)[1]["image"]
    assert isinstance(pil, Image.Image) and pil.size == (size, size) and pil.mode == "RGB"
    assert torch.equal(torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255.0, image)


def test_index_out_of_range(atlas):
    dataset = EmojiDataset(num_samples=3)
    with pytest.raises(IndexError):
        dataset[3]


def test_single_glyph_caption_is_unicode_name_and_label_matches(atlas):
    dataset = EmojiDataset(image_size=16, num_samples=200)
    for i in range(0, 200, 17):
        item = dataset[i]
        assert len(item["chars"]) == 1
        char = item["chars"]
        assert item["caption"] == unicodedata.name(char).lower()
        assert dataset.glyphs[item["label"]].char == char
        assert item["label"] == i % dataset.num_classes
        assert dataset.class_names[item["label"]] == item["caption"]


def test_multi_glyph_scenes_and_collate(atlas):
    augment = AugmentConfig(max_glyphs_per_scene=3)
    dataset = EmojiDataset(image_size=32, num_samples=40, augment=augment)
    counts = set()
    for i in range(40):
        item = dataset[i]
        chars = item["chars"]
        counts.add(len(chars))
        assert len(set(chars)) == len(chars)
        assert dataset.glyphs[item["label"]].char == chars[0]
        names = [unicodedata.name(c).lower() for c in chars]
        assert item["caption"] == scene_caption(names) == dataset.caption_for(chars)
    assert counts == {1, 2, 3}
    batch = next(iter(DataLoader(dataset, batch_size=8)))
    assert batch["image"].shape == (8, 3, 32, 32)
    assert len(batch["caption"]) == 8 and len(batch["chars"]) == 8


def test_scene_caption_grammar():
    assert scene_caption(["grinning face"]) == "grinning face"
    assert scene_caption(["grinning face", "red apple"]) == "a grinning face and a red apple"
    assert scene_caption(["cat", "eye", "two hearts"]) == "a cat, an eye and two hearts"
    caption = scene_caption(["woman with bunny ears", "hourglass"])
    assert caption == "a woman with bunny ears and an hourglass"
    with pytest.raises(ValueError):
        scene_caption([])


def test_class_subsets(atlas):
    by_char = EmojiDataset(num_samples=10, classes=["\U0001f34e", "grinning face", "CAT"])
    assert by_char.class_names == ["red apple", "grinning face", "cat"]
    assert by_char.num_classes == 3
    assert [by_char[i]["label"] for i in range(6)] == [0, 1, 2, 0, 1, 2]
    assert by_char[4]["chars"] == "\U0001f600"
    assert by_char.caption_for([0, 1]) == "a red apple and a grinning face"
    distinct = EmojiDataset(num_samples=10, classes=12)
    assert distinct.num_classes == 12
    expected = [atlas.glyphs[i].char for i in select_distinct_glyphs(atlas, 12)]
    assert [g.char for g in distinct.glyphs] == expected


def test_augmentation_gives_variety(atlas):
    dataset = EmojiDataset(image_size=32, num_samples=100, classes=5)
    i, j = _same_class_pair(dataset)
    assert dataset[i]["label"] == dataset[j]["label"]
    assert not torch.equal(dataset[i]["image"], dataset[j]["image"])
    images = torch.stack([dataset[k]["image"] for k in range(0, 100, 5)])  # all class 0
    spread = images.std(dim=0).mean()
    assert spread > 0.05


def test_no_augmentation_is_identical_up_to_background(atlas):
    face = ["grinning face"]
    plain = EmojiDataset(image_size=32, num_samples=20, classes=face, augment=AugmentConfig.none())
    assert torch.equal(plain[0]["image"], plain[5]["image"])
    solid_only = AugmentConfig.none(backgrounds=("solid",))
    solid = EmojiDataset(image_size=32, num_samples=20, classes=face, augment=solid_only)
    a, b = solid[0]["image"], solid[5]["image"]
    # The face is opaque in the middle, so only the background around it may differ.
    assert torch.equal(a[:, 12:20, 12:20], b[:, 12:20, 12:20])
    assert not torch.equal(a[:, :2, :2], b[:, :2, :2])


def test_bad_arguments(atlas):
    with pytest.raises(ValueError, match="image_size"):
        EmojiDataset(image_size=4)
    with pytest.raises(ValueError, match="unknown emoji class 'not an emoji'"):
        EmojiDataset(classes=["not an emoji"])
    with pytest.raises(ValueError, match="classes=0"):
        EmojiDataset(classes=0)
    with pytest.raises(ValueError, match="twice"):
        EmojiDataset(classes=["cat", "\U0001f408"])
    with pytest.raises(ValueError, match="seed"):
        EmojiDataset(seed=-1)
    with pytest.raises(ValueError, match="num_samples"):
        EmojiDataset(num_samples=0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"position_jitter": 0.9}, "position_jitter"),
        ({"scale_range": (0.9, 0.5)}, "scale_range"),
        ({"rotation_degrees": -1.0}, "rotation_degrees"),
        ({"backgrounds": ("plaid",)}, "backgrounds"),
        ({"max_glyphs_per_scene": 0}, "max_glyphs_per_scene"),
    ],
)
def test_bad_augment_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AugmentConfig(**kwargs)
