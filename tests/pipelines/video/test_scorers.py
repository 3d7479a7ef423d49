"""Frame scorers (issue 15): the registry, the aggregation shared with the router, calibration,
and each scorer (VLM caption likelihood on the embedded captioner, CLIP through open_clip with
random weights, the ImageReward adapter with a stand-in of its interface)."""

from __future__ import annotations

import math

import pytest
import torch

from mmspec.pipelines.video.scorers import (
    FRAME_SCORERS,
    FrameScorer,
    aggregate_frame_scores,
    calibrate_tau,
    get_frame_scorer,
)
from mmspec.routers import ScoreThresholdRouter
from mmspec.types import Draft, Scores


class BrightnessScorer(FrameScorer):
    """A scorer whose value is known: each frame's mean brightness (plus the caption's length,
    to check captions reach the right frames)."""

    name = "test-brightness"
    measures = "mean pixel value + len(caption)"

    def __init__(self, batch_size: int = 64) -> None:
        super().__init__(batch_size)
        self.calls: list[int] = []

    def score_images(self, captions, images):
        self.calls.append(len(captions))
        return images.mean(dim=(1, 2, 3)) + torch.tensor([float(len(c)) for c in captions])


def test_registry_lists_the_three_scorers_and_rejects_unknown_names_and_options():
    assert {"vlm", "clip", "imagereward"} <= set(FRAME_SCORERS)
    with pytest.raises(ValueError, match="unknown frame scorer 'nope'.*clip"):
        get_frame_scorer("nope")
    with pytest.raises(ValueError, match="no option.*colour.*its options: weights, model_name"):
        get_frame_scorer("clip", colour=1)
    scorer = BrightnessScorer()
    assert get_frame_scorer(scorer) is scorer
    with pytest.raises(ValueError, match="not both"):
        get_frame_scorer(scorer, batch_size=2)


def test_score_flattens_frames_in_batches_and_keeps_rows_with_their_prompts():
    torch.manual_seed(0)
    frames = torch.rand(3, 5, 3, 4, 4)  # [B, F, 3, H, W]
    scorer = BrightnessScorer(batch_size=4)
    out = scorer.score(["a", "bb", "ccc"], frames)
    assert out.shape == (3, 5) and out.dtype == torch.float32
    expected = frames.mean(dim=(2, 3, 4)) + torch.tensor([1.0, 2.0, 3.0])[:, None]
    torch.testing.assert_close(out, expected)
    assert scorer.calls == [4, 4, 4, 3]  # 15 frames, at most 4 per forward


@pytest.mark.parametrize(
    ("frames", "prompts", "match"),
    [
        (torch.rand(2, 3, 4, 4), ["a", "b"], r"\[B, F, 3, H, W\]"),
        (torch.rand(2, 1, 1, 4, 4), ["a", "b"], r"\[B, F, 3, H, W\]"),
        (torch.zeros(2, 1, 3, 4, 4, dtype=torch.uint8), ["a", "b"], "floats"),
        (torch.rand(2, 1, 3, 4, 4), ["a"], "1 prompts for 2 videos"),
        (torch.rand(2, 1, 3, 4, 4), "ab", "list of strings"),
    ],
)
def test_score_rejects_bad_inputs(frames, prompts, match):
    with pytest.raises(ValueError, match=match):
        BrightnessScorer().score(prompts, frames)


def test_aggregation_is_the_routers():
    values = torch.tensor([[0.0, 1.0, 2.0, 3.0], [5.0, -1.0, 4.0, 4.0]])
    torch.testing.assert_close(aggregate_frame_scores(values, "min"), torch.tensor([0.0, -1.0]))
    torch.testing.assert_close(aggregate_frame_scores(values, "mean"), torch.tensor([1.5, 3.0]))
    torch.testing.assert_close(aggregate_frame_scores(values, "quantile", 0.5), torch.tensor([1.5, 4.0]))
    for aggregate in ("min", "mean", "quantile"):
        router = ScoreThresholdRouter(tau=1.0, aggregate=aggregate, quantile=0.5)
        verdict = router.verify(Draft(tokens=torch.zeros(2, 1, 4)), Scores(values), None)
        kept = verdict.source[:, 0] == 1  # SOURCE_ACCEPTED
        assert kept.tolist() == (aggregate_frame_scores(values, aggregate, 0.5) >= 1.0).tolist()
    with pytest.raises(ValueError, match="aggregate must be one of"):
        aggregate_frame_scores(values, "max")
    with pytest.raises(ValueError, match="quantile must be"):
        aggregate_frame_scores(values, "quantile", 1.5)
    with pytest.raises(ValueError, match=r"\[B, F\]"):
        aggregate_frame_scores(values[0], "min")


def test_calibrate_tau_is_the_percentile_of_target_block_scores():
    scores = torch.arange(101, dtype=torch.float32)  # 0 .. 100
    assert calibrate_tau(scores, 10) == pytest.approx(10.0)
    assert calibrate_tau(scores.tolist(), 2.5) == pytest.approx(2.5)
    assert calibrate_tau([3.0, 1.0, 2.0], 0) == 1.0 and calibrate_tau([3.0, 1.0, 2.0], 100) == 3.0
    # about p % of the target's own blocks fall below tau
    torch.manual_seed(0)
    sample = torch.randn(10_000)
    tau = calibrate_tau(sample, 20)
    assert abs(float((sample < tau).float().mean()) - 0.20) < 1e-3
    with pytest.raises(ValueError, match="at least one"):
        calibrate_tau([], 10)
    with pytest.raises(ValueError, match="non-finite"):
        calibrate_tau([1.0, math.nan], 10)
    with pytest.raises(ValueError, match=r"percentile must be a number in \[0, 100\]"):
        calibrate_tau([1.0], 101)
