"""The video reference recipe end to end at tiny size (``mmspec train-video --preset tiny``), and
the emoji clips it trains on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmspec.app.cli import main
from mmspec.data.emoji_video import MOTIONS, EmojiClipConfig, render_clip, render_clips
from mmspec.pipelines.video import BlockCausalVideoTransformer, FrameAutoencoderKL, VideoPipeline


def test_clips_are_deterministic_and_move():
    config = EmojiClipConfig(image_size=16, num_frames=4, num_classes=3, num_clips=6)
    frames, labels = render_clips(config)
    assert frames.shape == (6, 4, 3, 16, 16) and frames.dtype == torch.uint8
    assert labels.tolist() == [0, 1, 2, 0, 1, 2]
    again, label, motion = render_clip(config, 4)
    assert np.array_equal(again.transpose(0, 3, 1, 2), frames[4].numpy()) and label == 1 and motion in MOTIONS
    moving = [i for i in range(6) if not torch.equal(frames[i, 0], frames[i, -1])]
    assert moving, "no clip changes over time"
    with pytest.raises(ValueError, match="glyph_scale"):
        EmojiClipConfig(glyph_scale=2.0)


def test_tiny_recipe_trains_every_stage_and_assembles_a_pipeline(tmp_path):
    out = tmp_path / "video"
    assert main(["train-video", "--preset", "tiny", "--stage", "vae", "--out", str(out)]) == 0
    assert not (out / "pipeline").exists()
    assert main(["train-video", "--preset", "tiny", "--out", str(out)]) == 0
    vae = FrameAutoencoderKL.from_pretrained(out / "vae")
    assert vae.config.scaling_factor > 0 and vae.config.scaling_factor != 1.0  # set from the latents
    draft = BlockCausalVideoTransformer.from_pretrained(out / "draft")
    assert draft.config.class_names and len(draft.config.class_names) == 2
    assert json.loads((out / "target" / "training.json").read_text())["stage"] == "target"
    pipe = VideoPipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    video = pipe(class_labels=[1], num_frames=4, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert video.frames.shape == (1, 4, 16, 16, 3) and np.isfinite(video.frames).all()
    drafted = pipe(class_labels=[1], num_frames=4, num_inference_steps=2, speculative="draft-only")
    assert drafted.stats.draft_blocks == 1
    # continuing a stage from its saved model (same configuration), with another learning rate
    argv = ["train-video", "--preset", "tiny", "--stage", "draft", "--out", str(out), "--init-from", str(out)]
    assert main([*argv, "--lr", "1e-4", "--steps", "2"]) == 0
    record = json.loads((out / "draft" / "training.json").read_text())
    assert record["config"]["lr"] == 1e-4 and record["continued_from"]["stage"] == "draft"
    with pytest.raises(SystemExit, match="--init-from continues a target or draft"):
        main(["train-video", "--preset", "tiny", "--stage", "vae", "--out", str(out), "--init-from", str(out)])
    # the batch size and the training noise grid of a stage are settings, recorded with it
    argv = ["train-video", "--preset", "tiny", "--stage", "target", "--out", str(out), "--steps", "2"]
    assert main([*argv, "--batch-size", "3", "--sampler-steps", "8"]) == 0
    record = json.loads((out / "target" / "training.json").read_text())
    assert record["config"]["batch_size"] == 3 and record["config"]["sampler_steps"] == 8
    with pytest.raises(SystemExit, match="--sampler-steps sets a video model's training noise"):
        main(["train-video", "--preset", "tiny", "--stage", "vae", "--out", str(out), "--sampler-steps", "8"])
    with pytest.raises(SystemExit, match="--batch-size must be >= 1"):
        main([*argv, "--batch-size", "0"])


def test_tiny_classifier_stage_records_its_held_out_accuracy(tmp_path):
    from mmspec.pipelines.video.scorer_classifier import FrameClassifier
    from mmspec.pipelines.video.scorers import get_frame_scorer

    out = tmp_path / "video"
    assert main(["train-video", "--preset", "tiny", "--stage", "vae", "--out", str(out)]) == 0
    assert main(["train-video", "--preset", "tiny", "--stage", "classifier", "--out", str(out)]) == 0
    record = json.loads((out / "classifier" / "training.json").read_text())
    for split in ("real", "vae_round_trip"):
        held_out = record["held_out"][split]
        assert 0.0 <= held_out["accuracy"] <= 1.0 and held_out["logprob_true_class"] <= 0.0
    classifier = FrameClassifier.from_pretrained(out / "classifier")
    assert classifier.config.image_size == 16 and len(classifier.config.class_names) == 2
    scorer = get_frame_scorer("classifier", path=out / "classifier")
    assert scorer.score(classifier.config.class_names[:1], torch.rand(1, 2, 3, 16, 16)).shape == (1, 2)
    assert not (out / "pipeline").exists()  # the classifier is a scorer, not a pipeline component


@pytest.mark.parametrize("stage", ["target", "classifier"])
def test_a_stage_without_its_vae_is_refused(tmp_path, stage):
    with pytest.raises(SystemExit, match="run --stage vae first"):
        main(["train-video", "--preset", "tiny", "--stage", stage, "--out", str(tmp_path)])
