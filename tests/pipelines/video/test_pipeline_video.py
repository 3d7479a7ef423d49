"""VideoPipeline: SDVG's extremes equal the single-model modes bit for bit, the KV-cached
block-causal forward equals the full masked forward, per-block stats, and clear errors."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from mmspec.pipelines.video import VIDEO_METHODS, BlockCausalVideoTransformer, VideoPipeline, teacher_forcing_mask
from mmspec.stats import SOURCE_ACCEPTED, SOURCE_PREFILL, SOURCE_RECOVERED

from ...conftest import tiny_video_model, tiny_video_vae


class BrightnessScorer(torch.nn.Module):
    """A stand-in frame scorer with the FrameScorer interface: each frame's mean brightness."""

    def score(self, prompts: list[str], frames: torch.Tensor) -> torch.Tensor:  # [B, F, 3, H, W] -> [B, F]
        assert len(prompts) == frames.shape[0]
        return frames.mean(dim=(2, 3, 4))


@functools.cache
def tiny_pipeline() -> VideoPipeline:
    pipe = VideoPipeline(
        target=tiny_video_model(seed=0),
        vae=tiny_video_vae(),
        drafter=tiny_video_model(seed=1, dim=16, depth=1),
        scorer=BrightnessScorer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, seed=0, **kwargs):
    args = {"class_labels": [0, 2], "num_frames": 6, "num_inference_steps": 3, "output_type": "pt"}
    return pipe(**{**args, **kwargs}, generator=torch.Generator().manual_seed(seed))


def test_cached_block_causal_forward_equals_the_full_masked_forward():
    model = tiny_video_model()
    gen = torch.Generator().manual_seed(3)
    clean = torch.randn(2, 6, 4, 4, 4, generator=gen)
    noisy = torch.randn(2, 6, 4, 4, 4, generator=gen)
    t = torch.rand(2, 3, generator=gen)
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        full = model.forward_teacher(clean, noisy, t, labels)
        cache = model.new_cache(2)
        model.prefill(labels, cache)
        cached = []
        for i in range(3):
            frames = slice(2 * i, 2 * i + 2)
            cached.append(model(noisy[:, frames], t[:, i], labels, 2 * i, cache))
            model(clean[:, frames], torch.zeros(2), labels, 2 * i, cache, write=True)
    torch.testing.assert_close(torch.cat(cached, 1), full, rtol=1e-5, atol=1e-5)
    # and the mask matters: attending everywhere changes the output
    mask = teacher_forcing_mask(3, model.tokens_per_block)
    assert not bool(mask.all()) and bool(mask[:, 0].all())


@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_tau_plus_inf_is_target_only_bit_for_bit(guidance_scale):
    pipe = tiny_pipeline()
    target_only = run(pipe, guidance_scale=guidance_scale)
    sdvg = run(pipe, guidance_scale=guidance_scale, speculative="sdvg", acceptance_options={"tau": math.inf})
    assert torch.equal(sdvg.latents, target_only.latents) and torch.equal(sdvg.frames, target_only.frames)
    s = sdvg.stats
    assert s.token_source[:, 0].eq(SOURCE_PREFILL).all() and s.token_source[:, 1:].eq(SOURCE_RECOVERED).all()
    assert s.scores[:, 0].isnan().all() and s.scores[:, 1:].isfinite().all()
    assert s.target_forwards == target_only.stats.target_forwards == 3 * (3 + 1)  # 3 steps + 1 cache write per block
    assert s.draft_forwards == 2 * 3 + 3  # drafts of blocks 1, 2 + a cache write per block


def test_tau_minus_inf_is_draft_only_bit_for_bit():
    pipe = tiny_pipeline()
    target_only = run(pipe)
    draft_only = run(pipe, speculative="draft-only")
    sdvg = run(pipe, speculative="sdvg", acceptance_options={"tau": -math.inf})
    assert torch.equal(sdvg.latents, draft_only.latents) and torch.equal(sdvg.frames, draft_only.frames)
    # the forced first block is the target's; the rest differ from target-only
    assert torch.equal(sdvg.latents[:, :2], target_only.latents[:, :2])
    assert not torch.equal(sdvg.latents[:, 2:], target_only.latents[:, 2:])
    for out in (sdvg, draft_only):
        assert out.stats.token_source[:, 1:].eq(SOURCE_ACCEPTED).all()
        assert out.stats.target_blocks == 2 and out.stats.draft_blocks == 4
    assert sdvg.stats.target_forwards == 3 + 1 + 2  # block 0 (3 steps + write), writes of blocks 1, 2
    assert draft_only.stats.target_forwards == 3  # block 0's steps only: nothing later reads the target's cache
    whole = run(pipe, speculative="draft-only", speculative_options={"forced_target_blocks": 0})
    assert whole.stats.target_forwards == 0 and whole.stats.draft_blocks == 6


def test_a_threshold_mixes_sources_and_records_each_block():
    pipe = tiny_pipeline()
    probe = run(pipe, speculative="sdvg", acceptance_options={"tau": -math.inf})
    scores = probe.stats.scores[:, 1:]
    tau = float(scores.median())
    out = run(pipe, speculative="sdvg", acceptance_options={"tau": tau})
    s = out.stats
    kept = s.token_source[:, 1:] == SOURCE_ACCEPTED
    torch.testing.assert_close(s.scores[:, 1:], scores)
    assert torch.equal(kept, scores >= tau) and 0 < int(kept.sum()) < kept.numel()
    summary = s.summary()
    for key in ("draft_time_s", "route_time_s", "decode_time_s", "score_time_s", "verify_time_s"):
        assert summary[key] >= 0.0
    assert 0.0 < summary["decode_time_s"] <= summary["route_time_s"]


def test_sdvg_options_and_aggregates():
    pipe = tiny_pipeline()
    out = run(pipe, speculative="sdvg", acceptance_options={"tau": 0.0, "aggregate": "mean"})
    assert out.stats.token_source[:, 1:].eq(SOURCE_ACCEPTED).all()  # brightness >= 0 always
    two = run(pipe, speculative="sdvg", acceptance_options={"tau": math.inf}, speculative_options={"draft_steps": 1})
    assert two.stats.draft_forwards == 2 * 1 + 3


def test_output_types_and_prompts():
    pipe = tiny_pipeline()
    pt = run(pipe)
    assert pt.frames.shape == (2, 6, 3, 16, 16) and pt.latents.shape == (2, 6, 4, 4, 4)
    np_out = run(pipe, output_type="np").frames
    assert np_out.shape == (2, 6, 16, 16, 3)
    pil = run(pipe, output_type="pil").frames
    assert len(pil) == 2 and len(pil[0]) == 6 and pil[0][0].size == (16, 16)
    by_name = pipe(
        prompt=["red apple", "Panda Face"],
        num_frames=6,
        num_inference_steps=3,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(by_name.latents, pt.latents)


def test_bad_inputs_are_clear_errors():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="not a whole number of blocks"):
        run(pipe, num_frames=5)
    with pytest.raises(ValueError, match="exceeds the model's max_frames"):
        run(pipe, num_frames=8)
    with pytest.raises(ValueError, match="name no class"):
        pipe(prompt="a unicorn", num_frames=2)
    with pytest.raises(ValueError, match="outside"):
        run(pipe, class_labels=[5])
    with pytest.raises(ValueError, match="tau"):
        run(pipe, speculative="sdvg")
    with pytest.raises(ValueError, match="takes no acceptance"):
        run(pipe, speculative="draft-only", acceptance_options={"tau": 0.0})
    with pytest.raises(ValueError, match="num_inference_steps"):
        run(pipe, num_inference_steps=0)
    with pytest.raises(ValueError, match="unknown speculative method"):
        run(pipe, speculative="medusa")
    with pytest.raises(ValueError, match="guidance_scale must be a number >= 0, got -2.0"):
        run(pipe, guidance_scale=-2.0)


def test_mismatched_components_are_refused():
    target, vae = tiny_video_model(), tiny_video_vae()
    with pytest.raises(ValueError, match="latent_size is 8, the target's 4"):
        VideoPipeline(target, vae, drafter=tiny_video_model(latent_size=8))
    with pytest.raises(ValueError, match="frames_per_block is 3"):
        VideoPipeline(target, vae, drafter=tiny_video_model(frames_per_block=3))
    with pytest.raises(ValueError, match="num_classes"):
        VideoPipeline(target, vae, drafter=tiny_video_model(num_classes=4, class_names=None))
    with pytest.raises(ValueError, match="the VAE makes"):
        VideoPipeline(target, tiny_video_vae(image_size=32))
    with pytest.raises(ValueError, match="scorer must be a FrameScorer"):
        VideoPipeline(target, vae, scorer=torch.nn.Linear(2, 2))
    no_scorer = VideoPipeline(target, vae, drafter=tiny_video_model(seed=1))
    with pytest.raises(ValueError, match="needs a frame scorer"):
        no_scorer(class_labels=[0], num_frames=2, speculative="sdvg", acceptance_options={"tau": 0.0})
    with pytest.raises(ValueError, match="latent frames must be"):
        target(torch.zeros(1, 2, 4, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long), 0, target.new_cache(1))


def test_methods_registry():
    assert VIDEO_METHODS.names() == ["draft-only", "sdvg"]
    assert not any(m.lossless for m in VIDEO_METHODS)
    assert isinstance(tiny_pipeline().target, BlockCausalVideoTransformer)
