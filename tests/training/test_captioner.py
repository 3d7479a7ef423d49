"""The captioner recipe (mmspec.training.captioner) and the embedded default captioner (mmspec.app.defaults)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from mmspec.app.defaults import default_captioner_path, load_default_captioner
from mmspec.pipelines.vlm import VLMPipeline, load_vlm_target
from mmspec.training.captioner import (
    captioner_configs,
    reply_vocabulary,
    save_captioner,
    train_caption_drafter,
    train_captioner,
)
from mmspec.training.captioner_cli import add_train_captioner_args, train_captioner_command
from mmspec.training.captioner_data import CaptionDataConfig, CaptionExamples, caption_loss, render_caption_data
from mmspec.training.captioner_model import (
    DEFAULT_QUESTION,
    TRAIN_QUESTIONS,
    build_caption_processor,
    build_caption_tokenizer,
    build_captioner,
    chat_prompt,
)
from mmspec.training.loop import latest_checkpoint
from mmspec.training.saved import (
    CAPTIONER_DRAFTER_SUBFOLDER,
    DRAFT_VOCAB_FILE,
    load_captioner_pipeline,
    read_draft_vocab,
)


@pytest.fixture(scope="module")
def tiny():
    """The ``tiny`` preset (16-px images, 4 classes), progress bars off."""
    return dataclasses.replace(captioner_configs("tiny"), progress=False)


def test_tokenizer_round_trips_captions_and_marks_unknown_words():
    captions = ["high-speed train", "do not litter symbol", "a cat, a dog and a do not litter symbol"]
    tokenizer = build_caption_tokenizer([*captions, *TRAIN_QUESTIONS])
    for caption in captions:
        ids = tokenizer.encode(caption, add_special_tokens=False)
        assert len(ids) == len(caption.replace(",", " ,").split())  # one per word, hyphenated names included
        assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == caption
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("image?", add_special_tokens=False)) == ["image", "?"]
    assert tokenizer.encode("zebra", add_special_tokens=False) == [tokenizer.unk_token_id]


def test_training_prompts_equal_the_pipeline_prompt(tiny):
    """What the model is trained on is token for token what VLMPipeline feeds it."""
    from mmspec.pipelines.vlm import VLMPipeline

    tokenizer = build_caption_tokenizer([*tiny.data.dataset().class_names, *TRAIN_QUESTIONS])
    processor = build_caption_processor(tokenizer, tiny.data.image_size, tiny.model.patch_size)
    images, captions, _ = render_caption_data(tiny.data)
    examples = CaptionExamples(processor, images, captions)
    assert chat_prompt(processor, "Hi").startswith("<s>USER: <image>\nHi ASSISTANT:")
    batch = examples.batch([0], [0])
    prompt = VLMPipeline(None, processor).build_prompt(PIL.Image.fromarray(images[0]), DEFAULT_QUESTION)
    answer_start = int(prompt.lengths[0])
    assert batch.input_ids[0, :answer_start].tolist() == prompt.tokens[0].tolist()
    assert torch.equal(batch.pixel_values, prompt.pixel_values)
    assert processor.tokenizer.decode(batch.labels[0, answer_start:].tolist(), skip_special_tokens=True) == captions[0]


def test_cached_vision_features_give_the_pixel_path_loss(tiny):
    """Instruction tuning feeds cached vision features; the model sees pixels: the same numbers."""
    model, processor = train_captioner(dataclasses.replace(tiny, vision_steps=2, steps=1))
    images, captions, _ = render_caption_data(tiny.data)
    examples = CaptionExamples(processor, images, captions)
    pixels = examples.batch(range(8), [1] * 8)
    examples.cache_features(model)
    cached = examples.batch(range(8), [1] * 8)
    assert cached.pixel_values is None and cached.image_features is not None
    with torch.no_grad():
        torch.testing.assert_close(caption_loss(model, cached), caption_loss(model, pixels))


def test_training_lowers_the_loss(tiny):
    config = dataclasses.replace(tiny, steps=12, lr=5e-3)
    model, processor = train_captioner(config)
    images, captions, _ = render_caption_data(config.data)
    batch = CaptionExamples(processor, images, captions).batch(list(range(16)), [0] * 16)
    torch.manual_seed(config.seed)
    untrained = build_captioner(config.model, config.data.image_size, processor.tokenizer)
    with torch.no_grad():
        assert caption_loss(model, batch)[0] < caption_loss(untrained, batch)[0] - 0.5


def test_resume_from_checkpoint_matches_uninterrupted_run(tiny, tmp_path):
    full, _ = train_captioner(dataclasses.replace(tiny, checkpoint_dir=str(tmp_path / "full")))
    assert latest_checkpoint(tmp_path / "full" / "vision").name == "step-0000004.pt"
    assert latest_checkpoint(tmp_path / "full" / "captioner").name == "step-0000006.pt"
    # A run "interrupted" during instruction tuning: vision done, only the step-3 checkpoint after it.
    shutil.copytree(tmp_path / "full" / "vision", tmp_path / "cut" / "vision")
    (tmp_path / "cut" / "captioner").mkdir()
    shutil.copy(tmp_path / "full" / "captioner" / "step-0000003.pt", tmp_path / "cut" / "captioner")
    # Other drafter settings leave the target's stages resumable (a longer draft stage over the same target).
    other_drafter = dataclasses.replace(tiny, draft_steps=tiny.draft_steps + 7, draft_lr=tiny.draft_lr / 2)
    resumed, _ = train_captioner(dataclasses.replace(other_drafter, checkpoint_dir=str(tmp_path / "cut"), resume=True))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert other_drafter.stage("drafter") != tiny.stage("drafter")
    with pytest.raises(ValueError, match="different settings"):  # a target setting still counts
        train_captioner(dataclasses.replace(tiny, lr=tiny.lr / 2, checkpoint_dir=str(tmp_path / "cut"), resume=True))


def test_drafter_shares_the_targets_vision_tower(tiny):
    model, processor = train_captioner(dataclasses.replace(tiny, steps=2))
    drafter = train_caption_drafter(model, processor, tiny)
    assert drafter.config.text_config.num_hidden_layers == tiny.draft_layers
    for name, value in model.model.vision_tower.state_dict().items():
        assert torch.equal(value, drafter.model.vision_tower.state_dict()[name]), name
    bad = dataclasses.replace(tiny, model=dataclasses.replace(tiny.model, text_dim=16))
    with pytest.raises(ValueError, match="except for text_layers"):
        train_caption_drafter(model, processor, bad)


def test_cli_trains_saves_and_evaluates_a_tiny_captioner(tmp_path):
    parser = argparse.ArgumentParser()
    add_train_captioner_args(parser)
    args = parser.parse_args(
        [
            "--preset",
            "tiny",
            "--out",
            str(tmp_path),
            "--no-progress",
            "--steps",
            "3",
            "--draft-steps",
            "2",
            "--grid",
            str(tmp_path / "grid.png"),
        ]
    )
    assert train_captioner_command(args) == 0
    folder = tmp_path / "captioner"
    assert (folder / "model.safetensors").is_file() and (folder / CAPTIONER_DRAFTER_SUBFOLDER / "config.json").is_file()
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["decoding"]["draft-model"]["same_as_baseline"] and metrics["decoding"]["ngram"]["same_as_baseline"]
    assert metrics["hf_generate_agreement"] == 1.0
    assert (tmp_path / "grid.png").is_file()


def test_drafter_can_learn_the_targets_own_replies(tiny, tmp_path, monkeypatch):
    """``draft_data="target"``: the drafter trains on the target's greedy replies to the first
    ``draft_steps x batch_size`` scenes (checkpoints in their own folder); unknown values fail."""
    import mmspec.training.captioner as recipe

    model, processor = train_captioner(dataclasses.replace(tiny, steps=2))
    config = dataclasses.replace(tiny, draft_steps=2, checkpoint_dir=str(tmp_path))
    seen = []

    class Recording(CaptionExamples):
        def __init__(self, processor, images, captions, *args):
            seen.append((len(images), list(captions)))
            super().__init__(processor, images, captions, *args)

    monkeypatch.setattr(recipe, "CaptionExamples", Recording)
    train_caption_drafter(model, processor, config, draft_data="target")
    count = config.draft_steps * config.batch_size
    images, captions, _ = render_caption_data(tiny.data, progress=False)
    pictures = [PIL.Image.fromarray(a) for a in images[:count]]
    max_new = max(len(processor.tokenizer.encode(c, add_special_tokens=False)) for c in captions)
    expected = VLMPipeline(load_vlm_target(model), processor)(
        pictures, [DEFAULT_QUESTION] * count, max_new_tokens=max_new + 4
    )
    assert seen == [(count, expected.text)]
    assert latest_checkpoint(tmp_path / "drafter-target") is not None and not (tmp_path / "drafter").exists()
    with pytest.raises(ValueError, match="draft_data must be one of"):
        train_caption_drafter(model, processor, config, draft_data="reference")


def test_saved_draft_vocabulary_reaches_the_loaded_drafter(tiny, tmp_path):
    """``save_captioner(draft_vocab=reply_vocabulary(...))`` writes the drafter's ids; the loaded
    pipeline's drafter scores exactly those and still reproduces the baseline's captions."""
    model, processor = train_captioner(dataclasses.replace(tiny, steps=2))
    drafter = train_caption_drafter(model, processor, dataclasses.replace(tiny, draft_steps=2))
    ids = reply_vocabulary(processor, tiny.data)
    _, captions, _ = render_caption_data(tiny.data, progress=False)
    tokenizer = processor.tokenizer
    assert ids == sorted(
        {tokenizer.eos_token_id}.union(*(tokenizer.encode(c, add_special_tokens=False) for c in captions))
    )
    assert len(ids) < tokenizer.vocab_size
    with pytest.raises(ValueError, match="pass the drafter"):
        save_captioner(model, processor, tmp_path / "bad", draft_vocab=ids)
    folder = save_captioner(model, processor, tmp_path / "captioner", drafter, draft_vocab=ids)
    assert read_draft_vocab(folder / CAPTIONER_DRAFTER_SUBFOLDER) == ids
    pipe = load_captioner_pipeline(folder)
    assert pipe.drafter.model.draft_head.ids.tolist() == ids
    images, _, _ = render_caption_data(tiny.data, heldout=True, progress=False)
    pictures = [PIL.Image.fromarray(a) for a in images[:4]]
    base = pipe(pictures, [DEFAULT_QUESTION] * 4, max_new_tokens=8, num_draft_tokens=0)
    spec = pipe(pictures, [DEFAULT_QUESTION] * 4, max_new_tokens=8, num_draft_tokens=3)
    assert spec.text == base.text and torch.equal(spec.token_ids, base.token_ids)
    for text in ("[1, -2]", "{}", "not json"):
        (folder / CAPTIONER_DRAFTER_SUBFOLDER / DRAFT_VOCAB_FILE).write_text(text)
        with pytest.raises(ValueError, match=DRAFT_VOCAB_FILE):
            read_draft_vocab(folder / CAPTIONER_DRAFTER_SUBFOLDER)


# ---------------------------------------------------------------------------------------- embedded default
@pytest.fixture(scope="module")
def default_pipe():
    return load_default_captioner()


@pytest.fixture(scope="module")
def unseen_scenes():
    """16 scenes of the embedded model's data configuration from a dataset seed used neither in
    training nor in the model card's held-out set."""
    recipe = json.loads((default_captioner_path() / "recipe.json").read_text())
    settings = recipe["config"]["data"]
    dataset = CaptionDataConfig(**{**settings, "seed": 777, "num_samples": settings["num_classes"]}).dataset()
    step = dataset.num_classes // 16  # item i shows class i % num_classes: spread over classes
    items = [dataset[i * step] for i in range(16)]
    return [item["image"] for item in items], [item["caption"] for item in items]


def test_default_assets_are_small_and_complete():
    path = default_captioner_path()
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 8 * 2**20
    assert (path / "MODEL_CARD.md").is_file()


def test_default_captioner_names_unseen_emoji(default_pipe, unseen_scenes):
    images, captions = unseen_scenes
    out = default_pipe(images, [DEFAULT_QUESTION] * len(images), max_new_tokens=16, num_draft_tokens=0)
    correct = sum(reply == caption for reply, caption in zip(out.text, captions))
    assert correct >= 14, list(zip(out.text, captions))


def test_default_captioner_greedy_speculation_equals_baseline(default_pipe, unseen_scenes):
    images, _ = unseen_scenes
    common = {"max_new_tokens": 16, "temperature": 0.0}
    baseline = default_pipe(images, [DEFAULT_QUESTION] * len(images), num_draft_tokens=0, **common)
    spec = default_pipe(images, [DEFAULT_QUESTION] * len(images), num_draft_tokens=4, **common)
    assert spec.text == baseline.text
    assert torch.equal(spec.token_ids, baseline.token_ids)
    assert spec.stats.steps < baseline.stats.steps


def test_default_captioner_matches_transformers_generate(default_pipe, unseen_scenes):
    images, _ = unseen_scenes
    model = LlavaForConditionalGeneration.from_pretrained(default_captioner_path(), dtype=torch.float32).eval()
    processor = default_pipe.processor
    for image in images[:4]:
        batch = processor(images=[image], text=[chat_prompt(processor, DEFAULT_QUESTION)], return_tensors="pt")
        reply = model.generate(**batch, do_sample=False, max_new_tokens=16)[0, batch["input_ids"].shape[1] :]
        ours = default_pipe(image, DEFAULT_QUESTION, max_new_tokens=16, num_draft_tokens=0)
        assert reply[: int(ours.lengths[0])].tolist() == ours.token_ids[0, : int(ours.lengths[0])].tolist()


def test_rendering_shows_a_bar_only_when_progress_is_on(capsys):
    """``--no-progress`` (``progress=False``) hides the data-rendering bar too, not only the training bars."""
    from mmspec.training.captioner_data import CaptionDataConfig, render_caption_data

    data = CaptionDataConfig(num_classes=4, num_samples=2048, heldout_samples=8)
    quiet = render_caption_data(data, progress=False)
    assert "render emoji" not in capsys.readouterr().err
    shown = render_caption_data(data, progress=True)
    assert "render emoji" in capsys.readouterr().err
    assert np.array_equal(quiet[0], shown[0]) and quiet[1] == shown[1]


def test_multi_glyph_scenes_give_list_captions_and_need_a_pretrained_lm(tmp_path):
    data = CaptionDataConfig(num_classes=8, num_samples=64, heldout_samples=8, max_glyphs_per_scene=3)
    captions = [data.dataset()[i]["caption"] for i in range(64)]
    assert any(" and " in c for c in captions) and any(" and " not in c for c in captions)  # 1..3 glyphs
    assert CaptionDataConfig().dataset()[0]["caption"].count(" and ") == 0  # one glyph by default
    parser = argparse.ArgumentParser()
    add_train_captioner_args(parser)
    for value, match in (("2", "needs a pretrained language model"), ("0", "must be >= 1")):
        args = parser.parse_args(["--preset", "tiny", "--out", str(tmp_path), "--max-glyphs", value])
        with pytest.raises(SystemExit, match=match):
            train_captioner_command(args)
    assert not any(tmp_path.iterdir())  # refused before any model was built or written
