"""MuLo-SD (arXiv 2601.05149): low-resolution drafting, up-sampling, pooled acceptance, local 2-D
rejection islands — on tiny components."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmspec.app.evaluation import EvalMethod, evaluate_llamagen
from mmspec.grid import dilate, island_schedule, label_islands, pooled_scores
from mmspec.pipelines.llamagen import LlamaGenCondition, LlamaGenPipeline
from mmspec.pipelines.llamagen.mulo import DecodeResizeEncode, make_upsampler, mulo_generate
from mmspec.rules import get_acceptance_rule
from mmspec.sampling import SamplingConfig, logits_to_probs
from mmspec.stats import SOURCE_ACCEPTED, SOURCE_PREFILL, SOURCE_RECOVERED

from ...conftest import tiny_llamagen


@pytest.fixture(scope="module")
def pipe() -> LlamaGenPipeline:
    """Target over a 6x6 grid, low-resolution drafter over 3x3, one VQ (16 codes)."""
    with torch.no_grad():
        gpt, vq = tiny_llamagen(grid=6)
        draft, _ = tiny_llamagen(grid=3, seed=1, dim=16, n_layer=1)
    pipe = LlamaGenPipeline(target=gpt, vq=vq, low_res_drafter=draft)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, labels, seed, guidance_scale=1.0, max_rounds=4, **options):
    out = pipe(
        class_labels=labels,
        guidance_scale=guidance_scale,
        speculative="mulo",
        acceptance_options=options,
        speculative_options={"max_rounds": max_rounds},
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    )
    return out.tokens, out.stats


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_tau_above_one_resamples_everything_and_equals_the_baseline(pipe, guidance_scale):
    """tau > 1 accepts nothing: one island (the grid) resampled in raster order with the target's
    generator draws in the baseline's order (the drafter uses a forked stream)."""
    base = pipe(
        class_labels=[1, 3], guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(7), output_type="pt"
    )
    tokens, stats = _run(pipe, [1, 3], 7, guidance_scale, tau=1.5)
    assert torch.equal(tokens, base.tokens)
    assert stats.resampled_fraction == 1.0 and int(stats.row_accepted.sum()) == 0
    assert stats.token_source[:, 0].eq(SOURCE_PREFILL).all() and stats.token_source[:, 1:].eq(SOURCE_RECOVERED).all()
    assert stats.steps == 36  # one verify + 35 AR steps (the baseline's 35 plus the verify)
    assert stats.converged.all() and stats.moved_mass_sum == 0


def test_tau_above_one_equals_the_baseline_for_text_conditions_with_padding():
    gpt, vq = tiny_llamagen(grid=4, model_type="t2i")
    draft, _ = tiny_llamagen(grid=2, seed=1, dim=16, n_layer=1, model_type="t2i")
    pipe = LlamaGenPipeline(target=gpt, vq=vq, low_res_drafter=draft)
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(2, 8, 24, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    base = pipe(
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(5),
        output_type="pt",
    )
    condition = LlamaGenCondition(caption_embs=embeds, caption_mask=mask)
    tokens, _ = mulo_generate(
        gpt,
        draft,
        condition,
        SamplingConfig(guidance_scale=3.0),
        make_upsampler("decode-resize-encode", vq),
        torch.Generator().manual_seed(5),
        acceptance_options={"tau": 2.0},
    )
    assert torch.equal(tokens, base.tokens)


def test_islands_from_a_hand_made_rejection_mask():
    rejected = torch.zeros(2, 6, 6, dtype=torch.bool)
    for r, c in [(0, 0), (0, 4), (4, 1), (5, 5)]:
        rejected[:, r, c] = True
    rejected[1, 4, 3] = True  # bridges the (4, 1) and (5, 5) neighbourhoods in row 1
    labels = label_islands(dilate(rejected, radius=1))
    expected0 = torch.tensor(
        [
            [1, 1, 0, 2, 2, 2],
            [1, 1, 0, 2, 2, 2],
            [0, 0, 0, 0, 0, 0],
            [3, 3, 3, 0, 0, 0],
            [3, 3, 3, 0, 4, 4],
            [3, 3, 3, 0, 4, 4],
        ]
    )
    expected1 = expected0.clone()
    expected1[3:, :] = torch.tensor([[3, 3, 3, 3, 3, 0], [3, 3, 3, 3, 3, 3], [3, 3, 3, 3, 3, 3]])
    assert torch.equal(labels, torch.stack([expected0, expected1]))
    schedule = island_schedule(labels)  # [B, I, S]
    assert schedule.shape == (2, 4, 17)  # row 1's merged island: 17 positions
    assert schedule[0, 0, :5].tolist() == [0, 1, 6, 7, -1]
    assert schedule[0, 3, :5].tolist() == [28, 29, 34, 35, -1]
    assert schedule[1, 3].eq(-1).all()  # row 1 has three islands
    island = schedule[1, 2]
    assert island[island >= 0].tolist() == sorted(torch.nonzero(expected1.flatten() == 3).flatten().tolist())
    # radius 0 keeps single positions; diagonal neighbours are one (8-connected) island
    lone = torch.zeros(1, 4, 4, dtype=torch.bool)
    lone[0, 1, 1] = lone[0, 2, 2] = lone[0, 0, 3] = True
    assert label_islands(dilate(lone, 0))[0].tolist() == [[0, 0, 0, 1], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 0]]
    assert island_schedule(label_islands(torch.zeros(1, 3, 3, dtype=torch.bool))).shape == (1, 0, 0)


class _PatchVQ:
    """A VQ that round-trips exactly: code i = a flat f x f patch of a distinct colour."""

    def __init__(self, colours: torch.Tensor, factor: int = 2) -> None:
        self.colours, self.factor = colours, factor  # [V, 3] in [-1, 1]

    def decode_code(self, indices: torch.Tensor) -> torch.Tensor:  # [B, h, w] -> [B, 3, h*f, w*f]
        image = self.colours[indices].permute(0, 3, 1, 2)
        return image.repeat_interleave(self.factor, 2).repeat_interleave(self.factor, 3)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = F.avg_pool2d(images, self.factor).permute(0, 2, 3, 1)  # [B, h, w, 3]
        indices = torch.cdist(mean.reshape(-1, 3), self.colours).argmin(-1).view(mean.shape[:3])
        return mean.permute(0, 3, 1, 2), indices


def test_decode_resize_encode_upsampler(pipe):
    g = torch.Generator().manual_seed(0)
    toy = DecodeResizeEncode(_PatchVQ(torch.rand(16, 3, generator=g) * 2 - 1))
    grid = torch.randint(0, 16, (2, 4, 4), generator=g)
    assert torch.equal(toy(grid, (4, 4)), grid)  # same resolution: exactly encode(decode(x))
    flat = torch.full((1, 2, 2), 5)
    assert torch.equal(toy(flat, (6, 6)), torch.full((1, 6, 6), 5))  # a constant image stays constant
    real = DecodeResizeEncode(pipe.vq)
    low = torch.randint(0, 16, (2, 3, 3), generator=g)
    up = real(low, (6, 6))
    assert up.shape == (2, 6, 6) and up.dtype == torch.long and torch.equal(up, real(low, (6, 6)))
    with pytest.raises(ValueError, match="multiple"):
        real(low, (5, 5))


def test_small_tau_needs_fewer_target_forwards_than_the_baseline(pipe):
    baseline_steps = 35  # one AR step per token after the prefill's
    tokens, stats = _run(pipe, [0, 2], 3, tau=0.0)  # everything accepted: one verify
    assert stats.steps == 1 and stats.resampled_fraction == 0.0
    assert stats.token_source.eq(SOURCE_ACCEPTED).all() and stats.token_step.eq(1).all()
    tokens, stats = _run(pipe, [0, 2], 3, tau=0.04, radius=0)
    assert 0 < stats.resampled_fraction < 1 and stats.steps < baseline_steps
    assert stats.draft_steps == 9 and stats.summary()["resampled_fraction"] == stats.resampled_fraction
    kept = stats.token_source == SOURCE_ACCEPTED
    assert torch.equal(stats.row_accepted, kept.sum(1)) and stats.mean_tokens_per_step == 36 / stats.steps
    assert 0 < float(stats.moved_mass_sum) <= int(kept.sum()) and int(stats.moved_mass_tokens) == 72


def _reference_pooled(scores: torch.Tensor, k: int, pool: str) -> torch.Tensor:
    """Loop implementation of the pooled score over in-grid k x k windows (checks pooled_scores)."""
    height, width = scores.shape[-2:]
    out = torch.empty_like(scores)
    for i in range(height):
        for j in range(width):
            window = scores[..., max(i - k // 2, 0) : i + k // 2 + 1, max(j - k // 2, 0) : j + k // 2 + 1].flatten(-2)
            out[..., i, j] = window.mean(-1) if pool == "mean" else window.amax(-1)
    return out


@pytest.mark.parametrize("pool, guidance_scale", [("mean", 1.0), ("max", 3.0)])
def test_kept_drafts_reach_tau_on_the_final_grid(pipe, pool, guidance_scale):
    """The stated guarantee, recomputed from scratch: teacher-forced target (with CFG) over the
    final grid, pooled independently; every kept draft of a converged row scores >= tau."""
    tau = 0.05 if pool == "mean" else 0.1
    labels = [4, 1]
    tokens, stats = _run(pipe, labels, 11, guidance_scale, tau=tau, pool=pool, radius=1, max_rounds=50)
    assert stats.converged.all()
    kept = (stats.token_source == SOURCE_ACCEPTED).view(2, 6, 6)
    assert kept.any() and not kept.all()
    flat = tokens.flatten(1)
    target = pipe.target
    cond = target.teacher_forced_logits(LlamaGenCondition(class_labels=torch.tensor(labels)), flat)
    null = torch.full((2,), target.config.num_classes)
    uncond = target.teacher_forced_logits(LlamaGenCondition(class_labels=null), flat)
    probs = logits_to_probs(cond, SamplingConfig(guidance_scale=guidance_scale), uncond)  # [B, N, V]
    scores = probs.gather(2, flat[..., None])[..., 0].view(2, 6, 6)
    pooled = _reference_pooled(scores, 3, pool)
    assert torch.allclose(pooled, pooled_scores(scores, 3, pool), atol=1e-6)
    assert (pooled[kept] >= tau - 1e-5).all()


def test_clear_errors(pipe):
    for bad in [dict(tau=-0.1), dict(pool_size=2), dict(pool="median"), dict(radius=-1)]:
        with pytest.raises(ValueError):
            get_acceptance_rule("mulo", {"grid": (6, 6)}, **bad)
    for bad in [dict(max_rounds=0), dict(upsampler="nearest")]:
        with pytest.raises(ValueError):
            pipe(class_labels=[0], speculative="mulo", speculative_options=bad)
    condition = LlamaGenCondition(class_labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="commits prefix"):
        pipe(class_labels=[0], speculative="mulo", acceptance="lantern")
    with pytest.raises(
        ValueError,
        match=r"unknown option\(s\) \[.delta.\] for acceptance rule .mulo.; its options: tau, pool_size, pool, radius",
    ):
        pipe(class_labels=[0], speculative="mulo", acceptance_options={"delta": 0.1})
    with pytest.raises(ValueError, match="unknown option"):
        pipe(class_labels=[0], speculative="mulo", speculative_options={"tau": 0.1})
    without = LlamaGenPipeline(target=pipe.target, vq=pipe.vq, drafter=pipe.low_res_drafter)
    with pytest.raises(ValueError, match="low_res_drafter"):
        without(class_labels=[0], speculative="mulo")
    with pytest.raises(ValueError, match="smaller grid"):
        LlamaGenPipeline(target=pipe.target, vq=pipe.vq, low_res_drafter=pipe.target)
    with pytest.raises(ValueError, match="not be larger"):
        mulo_generate(
            pipe.low_res_drafter,
            pipe.target,
            condition,
            SamplingConfig(),
            make_upsampler("decode-resize-encode", pipe.vq),
        )


def test_mulo_in_mmspec_eval(pipe):
    report = evaluate_llamagen(
        pipe,
        [EvalMethod.parse("mulo:mulo:tau=0.04,radius=0")],
        [0, 1, 2, 3],
        batch_size=2,
        sampling={"guidance_scale": 2.0},
    )
    (mulo,) = report["methods"]
    assert mulo["steps"] < report["baseline"]["steps"]
    assert 0 < mulo["mean_tvd_per_token"] <= mulo["max_tvd_per_token"] <= 1
    assert mulo["fid_vs_baseline"] >= 0
