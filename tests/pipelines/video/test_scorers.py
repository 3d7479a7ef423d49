"""Frame scorers (issue 15): the registry, the aggregation shared with the router, calibration,
and each scorer (VLM caption likelihood on the embedded captioner, CLIP through open_clip with
random weights, the ImageReward adapter with a stand-in of its interface).

The CLIP tests are skipped where open_clip is not installed (the dev install); docs/video_scorers.md
("Tests") says how to run them on the CPU machines."""

from __future__ import annotations

import math
import sys

import numpy as np
import PIL.Image
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


# ---------------------------------------------------------------------------------------- "vlm"
@pytest.fixture(scope="module")
def captioner_scorer():
    from mmspec.app.defaults import default_captioner_path

    return get_frame_scorer("vlm", path=default_captioner_path())


@pytest.fixture(scope="module")
def emoji_scenes():
    """32 scenes of the embedded captioner's data configuration, from a dataset seed used neither
    in its training nor in its held-out set, spread over its 128 classes."""
    import json

    from mmspec.app.defaults import default_captioner_path
    from mmspec.training.captioner_data import CaptionDataConfig

    settings = json.loads((default_captioner_path() / "recipe.json").read_text())["config"]["data"]
    dataset = CaptionDataConfig(**{**settings, "seed": 4242, "num_samples": settings["num_classes"]}).dataset()
    items = [dataset[i * 4 + 1] for i in range(32)]
    images = [torch.from_numpy(np.array(item["image"].convert("RGB"))).permute(2, 0, 1) for item in items]
    return torch.stack(images).float() / 255, [item["caption"] for item in items]  # [32, 3, H, W] in [0, 1]


def test_vlm_scorer_default_question_is_the_captioners(captioner_scorer):
    from mmspec.training.captioner_model import DEFAULT_QUESTION

    assert captioner_scorer.question == DEFAULT_QUESTION


def test_vlm_scorer_prefers_the_true_caption_on_real_emoji(captioner_scorer, emoji_scenes):
    images, captions = emoji_scenes
    wrong = captions[7:] + captions[:7]  # another scene's name for every image
    frames = images.reshape(8, 4, *images.shape[1:])  # 8 "videos" of 4 frames: [B, F, 3, H, W]
    true_scores = captioner_scorer.score([captions[i * 4] for i in range(8)], frames[:, :1].expand(-1, 4, -1, -1, -1))
    assert true_scores.shape == (8, 4)
    per_image_true = captioner_scorer.score(captions, images[:, None])[:, 0]  # [32]
    per_image_wrong = captioner_scorer.score(wrong, images[:, None])[:, 0]
    assert (per_image_true <= 0).all() and (per_image_wrong <= 0).all()  # log-probabilities
    assert per_image_true.mean() > per_image_wrong.mean() + 2.0, (per_image_true.mean(), per_image_wrong.mean())
    assert (per_image_true > per_image_wrong).float().mean() >= 0.9
    # the same frame and prompt score the same wherever they sit in the batch
    torch.testing.assert_close(true_scores[:, 0], per_image_true[::4])


def test_vlm_scorer_is_the_models_own_log_probability(captioner_scorer, emoji_scenes):
    """Teacher-forced mean log-probability of the answer tokens equals transformers' forward on
    the full chat (prompt + answer), whatever the batch and padding."""
    from transformers import LlavaForConditionalGeneration

    from mmspec.app.defaults import default_captioner_path
    from mmspec.pipelines.video.scorer_base import frames_to_pil

    images, captions = emoji_scenes
    captions = [captions[0], "high-speed train", captions[2] + " with extra words"]
    model = LlavaForConditionalGeneration.from_pretrained(default_captioner_path(), dtype=torch.float32).eval()
    processor = captioner_scorer.pipeline.processor
    small = get_frame_scorer("vlm", pipeline=captioner_scorer.pipeline, batch_size=2)
    ours = small.score(captions, images[:3, None])[:, 0]
    for i, (caption, image) in enumerate(zip(captions, frames_to_pil(images[:3]))):
        chat = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": captioner_scorer.question}]},
            {"role": "assistant", "content": [{"type": "text", "text": caption}]},
        ]
        batch = processor(
            images=[image], text=[processor.apply_chat_template(chat, tokenize=False)], return_tensors="pt"
        )
        with torch.no_grad():
            logprobs = model(**batch).logits[0].log_softmax(-1)  # [T, V]
        ids = batch["input_ids"][0]
        n = len(captioner_scorer.answer_ids(caption))
        expected = logprobs[-n - 1 : -1].gather(-1, ids[-n:, None]).mean()
        torch.testing.assert_close(ours[i], expected, atol=1e-5, rtol=1e-5)


def test_vlm_scorer_options_and_missing_model(tmp_path, captioner_scorer):
    with pytest.raises(ValueError, match="exactly one of pipeline= .* or path="):
        get_frame_scorer("vlm")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        get_frame_scorer("vlm", path=tmp_path / "nothing")
    with pytest.raises(ValueError, match="question must be a non-empty string"):
        get_frame_scorer("vlm", pipeline=captioner_scorer.pipeline, question=" ")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        get_frame_scorer("vlm", pipeline=captioner_scorer.pipeline, batch_size=0)


# ---------------------------------------------------------------------------------------- "imagereward"
class StandInImageReward:
    """The interface of ``ImageReward.load(...)``'s model: ``score(prompt, images)`` returns one
    reward per image, a plain float for a one-image list (as ImageReward's ``inference_rank``
    squeezes it). Its reward: mean red minus mean blue, plus the prompt's length."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def score(self, prompt, images):
        assert all(isinstance(image, PIL.Image.Image) for image in images)
        self.calls.append((prompt, len(images)))
        rewards = [
            float(np.asarray(im, dtype=np.float64)[..., 0].mean() - np.asarray(im, dtype=np.float64)[..., 2].mean())
            / 255
            + len(prompt)
            for im in images
        ]
        return rewards[0] if len(rewards) == 1 else rewards


def test_imagereward_adapter_calls_the_models_interface_per_prompt():
    torch.manual_seed(0)
    frames = torch.rand(2, 3, 3, 8, 8)
    model = StandInImageReward()
    scorer = get_frame_scorer("imagereward", model=model, batch_size=4)
    out = scorer.score(["red", "blue!"], frames)
    quantised = (frames * 255).round() / 255
    expected = quantised[:, :, 0].mean(dim=(-1, -2)) - quantised[:, :, 2].mean(dim=(-1, -2))
    expected += torch.tensor([3.0, 5.0])[:, None]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    # batches of 4 frames: [red x3, blue x1] then [blue x2]; each run of one prompt is one call
    assert model.calls == [("red", 3), ("blue!", 1), ("blue!", 2)]


def test_imagereward_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="exactly one of weights=PATH"):
        get_frame_scorer("imagereward")
    missing = tmp_path / "ImageReward.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        get_frame_scorer("imagereward", weights=missing)
    missing.write_bytes(b"not used")
    monkeypatch.setitem(sys.modules, "ImageReward", None)  # not installed
    with pytest.raises(ImportError, match="pip install image-reward"):
        get_frame_scorer("imagereward", weights=missing)
    with pytest.raises(ValueError, match="score\\(prompt, images\\)"):
        get_frame_scorer("imagereward", model=object())

    class Short(StandInImageReward):
        def score(self, prompt, images):
            return [0.0]

    with pytest.raises(ValueError, match="returned 1 rewards for 3 images"):
        get_frame_scorer("imagereward", model=Short()).score(["x"], torch.rand(1, 3, 3, 4, 4))


# ---------------------------------------------------------------------------------------- "clip"
#: A tiny open_clip architecture (random weights; no CLIP weights exist on the test machines).
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """open_clip with the tiny architecture registered as "mmspec-tiny-clip", and a weights file of
    a random model of it."""
    import json

    open_clip = pytest.importorskip("open_clip", reason='open_clip is not installed (pip install "mmspec[clip]")')
    folder = tmp_path_factory.mktemp("clip")
    (folder / "mmspec-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder / "mmspec-tiny-clip.json")
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("mmspec-tiny-clip", pretrained=None)
    torch.save(model.state_dict(), folder / "weights.pt")
    return open_clip, model.eval(), preprocess, folder / "weights.pt"


def test_clip_scorer_loads_weights_from_a_path_and_scores_cosines(tiny_clip):
    open_clip, model, preprocess, weights = tiny_clip
    scorer = get_frame_scorer("clip", model_name="mmspec-tiny-clip", weights=weights, batch_size=3)
    torch.manual_seed(1)
    frames = torch.rand(2, 4, 3, 24, 40)  # [B, F, 3, H, W], not square: resized and centre-cropped
    prompts = ["a red apple", "a bouncing ball"]
    out = scorer.score(prompts, frames)
    assert out.shape == (2, 4)
    with torch.no_grad():
        text = torch.nn.functional.normalize(
            model.encode_text(open_clip.get_tokenizer("mmspec-tiny-clip")(prompts)), dim=-1
        )
        image = model.encode_image(preprocess(frames.reshape(8, 3, 24, 40)))
        image = torch.nn.functional.normalize(image, dim=-1).reshape(2, 4, -1)
    expected = 100 * (image * text[:, None]).sum(-1)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert (out.abs() <= 100 + 1e-3).all()


def test_clip_scorer_errors(tiny_clip, tmp_path, monkeypatch):
    _, _, _, weights = tiny_clip
    with pytest.raises(ValueError, match="needs weights=PATH"):
        get_frame_scorer("clip")
    missing = tmp_path / "clip-vit.pt"
    with pytest.raises(FileNotFoundError, match=f"CLIP weights not found: '{missing}'"):
        get_frame_scorer("clip", weights=missing)
    with pytest.raises(FileNotFoundError, match="open_clip model config not found: .*tiny.json"):
        get_frame_scorer("clip", model_name=str(tmp_path / "tiny.json"), weights=weights)
    with pytest.raises(ValueError, match="no model 'ViT-Nope'"):
        get_frame_scorer("clip", model_name="ViT-Nope", weights=weights)
    with pytest.raises(ValueError, match="does not hold weights of open_clip's 'ViT-B-32'"):
        get_frame_scorer("clip", model_name="ViT-B-32", weights=weights)
    monkeypatch.setitem(sys.modules, "open_clip", None)  # not installed
    with pytest.raises(ImportError, match=r'pip install "mmspec\[clip\]"'):
        get_frame_scorer("clip", model_name="mmspec-tiny-clip", weights=weights)


def test_clip_scorer_runs_vit_b_32_with_random_weights(tiny_clip):
    """The architecture real CLIP weights come in (random here: none ship offline)."""
    from mmspec.pipelines.video.scorer_clip import CLIPFrameScorer

    open_clip = tiny_clip[0]
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    scorer = CLIPFrameScorer(model, open_clip.get_tokenizer("ViT-B-32"), preprocess)
    out = scorer.score(["a grinning face"], torch.rand(1, 2, 3, 32, 32))
    assert out.shape == (1, 2) and torch.isfinite(out).all()


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"])
def test_vlm_scorer_equals_transformers_on_every_vlm_family(family):
    """On tiny random VLMs of every family (M-RoPE and any-resolution tiling included), the score
    is transformers' own teacher-forced mean log-probability of the answer tokens."""
    from mmspec.pipelines.video.scorer_base import frames_to_pil

    from ..vlm.test_vlm import tiny_pipeline, tiny_vlm

    model, processor = tiny_vlm(family)
    scorer = get_frame_scorer("vlm", pipeline=tiny_pipeline(family), question="describe the image", batch_size=3)
    torch.manual_seed(0)
    frames = torch.rand(2, 2, 3, 20, 24)  # [B, F, 3, H, W]
    prompts = ["a cat", "what is in this picture"]
    ours = scorer.score(prompts, frames)
    for b, prompt in enumerate(prompts):
        for f, image in enumerate(frames_to_pil(frames[b])):
            chat = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": scorer.question}]},
                {"role": "assistant", "content": [{"type": "text", "text": prompt}]},
            ]
            text = processor.apply_chat_template(chat, tokenize=False)
            batch = processor(images=[image], text=[text], return_tensors="pt")
            with torch.no_grad():
                logprobs = model(**batch).logits[0].float().log_softmax(-1)  # [T, V]
            # the answer sits at the end of prompt + answer, before the template's tail (if any)
            ids, answer = batch["input_ids"][0], scorer.answer_ids(prompt)
            n = len(answer)
            pos = max(i for i in range(len(ids) - n + 1) if ids[i : i + n].tolist() == answer)
            expected = logprobs[pos - 1 : pos - 1 + n].gather(-1, ids[pos : pos + n, None]).mean()
            torch.testing.assert_close(ours[b, f], expected, atol=1e-4, rtol=1e-4)
