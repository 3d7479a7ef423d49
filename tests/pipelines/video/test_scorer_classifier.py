"""The ``"classifier"`` frame scorer (issue 15): a small CNN's log-probability of the prompt's
class, on a random classifier (exact values) and on the embedded one (it separates real clips of
the right class from the same clips under another class's name)."""

from __future__ import annotations

import pytest
import torch

from mmspec.pipelines.video.scorer_classifier import ClassifierFrameScorer, FrameClassifier
from mmspec.pipelines.video.scorers import FRAME_SCORERS, aggregate_frame_scores, get_frame_scorer

NAMES = ["red apple", "grinning face", "panda face"]


@pytest.fixture(scope="module")
def random_classifier():
    torch.manual_seed(0)
    model = FrameClassifier(image_size=16, num_classes=3, channels=8, class_names=NAMES)
    with torch.no_grad():  # large random weights: logits far from uniform
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


def test_classifier_scorer_is_registered_and_scores_the_log_probability_of_the_prompts_class(random_classifier):
    assert FRAME_SCORERS["classifier"] is ClassifierFrameScorer
    torch.manual_seed(1)
    frames = torch.rand(2, 3, 3, 16, 16)  # [B, F, 3, H, W]
    scorer = ClassifierFrameScorer(random_classifier, batch_size=4)
    out = scorer.score([" Panda Face", "red apple"], frames)  # matched as the pipeline matches prompts
    assert out.shape == (2, 3) and out.dtype == torch.float32 and (out <= 0).all()
    logprobs = torch.log_softmax(random_classifier(frames.flatten(0, 1)), dim=-1).reshape(2, 3, 3)
    torch.testing.assert_close(out[0], logprobs[0, :, 2])
    torch.testing.assert_close(out[1], logprobs[1, :, 0])
    assert not torch.allclose(out[0], logprobs[0, :, 0])  # the class matters
    torch.testing.assert_close(aggregate_frame_scores(out, "min"), out.min(dim=1).values)


def test_classifier_scorer_bad_inputs(random_classifier, tmp_path):
    scorer = ClassifierFrameScorer(random_classifier)
    with pytest.raises(ValueError, match=r"prompt 'blue whale' names no class.*panda face"):
        scorer.score(["blue whale"], torch.rand(1, 2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"takes frames \[N, 3, 16, 16\], got \(2, 3, 32, 32\)"):
        scorer.score(["red apple"], torch.rand(1, 2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, F, 3, H, W\]"):
        scorer.score(["red apple"], torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="needs path="):
        get_frame_scorer("classifier")
    with pytest.raises(FileNotFoundError, match="no frame classifier.*config.json is missing"):
        get_frame_scorer("classifier", path=tmp_path)
    with pytest.raises(ValueError, match="must be a FrameClassifier"):
        ClassifierFrameScorer(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="2 class_names for 3 classes"):
        FrameClassifier(num_classes=3, class_names=NAMES[:2])
    unnamed = ClassifierFrameScorer(FrameClassifier(image_size=16, num_classes=3, channels=8))
    with pytest.raises(ValueError, match="no class_names"):
        unnamed.score(["red apple"], torch.rand(1, 1, 3, 16, 16))


def test_classifier_round_trips_through_save_pretrained(random_classifier, tmp_path):
    random_classifier.save_pretrained(tmp_path / "classifier")
    scorer = get_frame_scorer("classifier", path=tmp_path / "classifier", batch_size=2)
    frames = torch.rand(1, 3, 3, 16, 16)
    expected = ClassifierFrameScorer(random_classifier).score(["grinning face"], frames)
    torch.testing.assert_close(scorer.score(["grinning face"], frames), expected)
    assert scorer.batch_size == 2 and scorer.class_names == NAMES


def test_embedded_classifier_separates_the_right_class_from_a_wrong_one():
    from mmspec.app.defaults import default_frame_classifier_path
    from mmspec.data.emoji_video import EmojiClipConfig, class_names, render_clips

    scorer = get_frame_scorer("classifier", path=default_frame_classifier_path())
    config = EmojiClipConfig(num_clips=32, seed=1_000_003)  # held-out clips (training: seed 0)
    names = class_names(config)
    assert scorer.class_names == names  # the video pair's classes, in label order
    frames, labels = render_clips(config)
    frames = frames.float() / 255.0  # [32, 8, 3, 32, 32]
    right = scorer.score([names[int(i)] for i in labels], frames)  # [32, 8]
    wrong = scorer.score([names[(int(i) + 5) % len(names)] for i in labels], frames)
    assert right.mean() > -0.5 and wrong.mean() < -4.0  # measured: about -0.05 and -10
    assert (aggregate_frame_scores(right, "min") > aggregate_frame_scores(wrong, "min")).all()


def test_a_video_folder_brings_its_own_classifier(random_classifier, tmp_path):
    """``build_scorer("classifier")`` reads ``<model folder>/classifier`` when the folder has one (a
    pair trained on other classes), else the embedded pair's."""
    from mmspec.app.defaults import default_frame_classifier_path
    from mmspec.app.models import build_scorer

    random_classifier.save_pretrained(tmp_path / "classifier")
    own = build_scorer("classifier", {}, "cpu", tmp_path)
    frames = torch.rand(1, 2, 3, 16, 16)
    torch.testing.assert_close(
        own.score(["panda face"], frames), ClassifierFrameScorer(random_classifier).score(["panda face"], frames)
    )
    if default_frame_classifier_path().is_dir():
        embedded = build_scorer("classifier", {}, "cpu", tmp_path / "elsewhere")
        assert embedded.classifier.config.class_names != NAMES
