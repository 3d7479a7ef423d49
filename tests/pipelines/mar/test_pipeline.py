"""MARPipeline on tiny random components: call conventions, save/load, errors, and CSpD on the
masked loop (draft = target with gamma = 1 reproduces the baseline; acceptance and stats)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline

from mmspec.methods import MethodRegistry
from mmspec.pipelines.base import SpeculativePipelineMixin
from mmspec.pipelines.mar import MAR_METHODS, MARPipeline, MARPipelineOutput
from mmspec.stats import SOURCE_ACCEPTED, SOURCE_PREFILL, SOURCE_RECOVERED

from ...conftest import tiny_mar, tiny_mar_vae

SEQ_LEN = 16  # tiny_mar: 4x4 tokens


@pytest.fixture(scope="module")
def target():
    return tiny_mar(seed=0)


@pytest.fixture(scope="module")
def pipe(target):
    pipe = MARPipeline(target=target, vae=tiny_mar_vae(), drafter=target)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, seed=0, **kwargs):
    kwargs = {
        "class_labels": [1, 3],
        "num_iter": 6,
        "guidance_scale": 2.5,
        "temperature": 0.9,
        "output_type": "pt",
        **kwargs,
    }
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs)


def test_pipeline_classes_and_registry(pipe):
    assert isinstance(pipe, SpeculativePipelineMixin) and isinstance(pipe, DiffusionPipeline)
    assert isinstance(MAR_METHODS, MethodRegistry) and MARPipeline.methods is MAR_METHODS
    method = MAR_METHODS.get("cspd")
    assert method.loop == "masked" and method.default_rule == "gaussian-exact" and method.requires == ("drafter",)


def test_call_conventions(pipe):
    out = call(pipe)
    assert isinstance(out, MARPipelineOutput)
    assert out.images.shape == (2, 3, 64, 64) and float(out.images.min()) >= 0 and float(out.images.max()) <= 1
    assert out.latents.shape == (2, 4, 4, 4)
    assert out.stats.steps == 6 and bool((out.stats.token_source == SOURCE_RECOVERED).all())
    assert out.stats.token_step.min() >= 1 and out.stats.token_step.max() == 6
    images, latents, stats = call(pipe, return_dict=False)
    assert torch.equal(latents, out.latents) and torch.equal(images, out.images)  # seed determinism
    assert not torch.equal(call(pipe, seed=1).latents, out.latents)
    arrays = call(pipe, output_type="np").images
    assert isinstance(arrays, np.ndarray) and arrays.shape == (2, 64, 64, 3)
    pils = call(pipe, output_type="pil").images
    assert len(pils) == 2 and isinstance(pils[0], PIL.Image.Image)
    seen = []
    call(pipe, callback_on_step_end=lambda p, step, t, kw: seen.append((step, int(kw["known"].sum()))))
    assert [s for s, _ in seen] == list(range(6)) and seen[-1][1] == 2 * SEQ_LEN
    assert [n for _, n in seen] == sorted(n for _, n in seen)


def test_orders_are_followed(pipe):
    orders = torch.stack([torch.arange(SEQ_LEN), torch.arange(SEQ_LEN).flip(0)])
    first = []
    call(
        pipe,
        orders=orders,
        callback_on_step_end=lambda p, s, t, kw: first.append(kw["known"].clone()) if s == 0 else None,
    )
    known = first[0]
    count = int(known[0].sum())
    assert (
        known[0, -count:].all() and known[1, :count].all()
    )  # each row's order from its end: mask_len first stay masked


def test_unconditional_and_batch_size(pipe):
    out = call(pipe, class_labels=None, batch_size=3, guidance_scale=1.0)
    assert out.latents.shape[0] == 3


def test_save_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = MARPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.target, type(pipe.target)) and loaded.drafter is not None
    assert torch.equal(call(loaded).latents, call(pipe).latents)
    assert torch.equal(
        call(loaded, speculative="cspd", num_draft_tokens=2).latents,
        call(pipe, speculative="cspd", num_draft_tokens=2).latents,
    )


def test_clear_errors(pipe, target):
    with pytest.raises(ValueError, match="outside"):
        call(pipe, class_labels=[7])
    with pytest.raises(ValueError, match="cfg_schedule"):
        call(pipe, cfg_schedule="cosine")
    with pytest.raises(ValueError, match="permutation"):
        call(pipe, orders=torch.zeros(2, SEQ_LEN, dtype=torch.long))
    with pytest.raises(ValueError, match="output_type"):
        call(pipe, output_type="jpg")
    with pytest.raises(ValueError, match="unknown speculative method"):
        call(pipe, speculative="sjd")
    with pytest.raises(ValueError, match="unknown option"):
        call(pipe, speculative="cspd", speculative_options={"gamma": 3})
    with pytest.raises(ValueError, match="commits prefix"):
        call(pipe, speculative="cspd", acceptance="exact")
    with pytest.raises(ValueError, match="gamma"):
        call(pipe, speculative="cspd", num_draft_tokens=0)
    with pytest.raises(ValueError, match="baseline option"):
        call(pipe, speculative="cspd", sample_last_step=True)
    with pytest.raises(ValueError, match="guidance_scale must be a number >= 0, got -1.0"):
        call(pipe, guidance_scale=-1.0)
    with pytest.raises(ValueError, match="temperature must be a number >= 0, got -0.5"):
        call(pipe, temperature=-0.5)
    no_drafter = MARPipeline(target=target, vae=pipe.vae)
    with pytest.raises(ValueError, match="drafter"):
        call(no_drafter, speculative="cspd")
    with pytest.raises(ValueError, match="vae_embed_dim"):
        MARPipeline(target=target, vae=tiny_mar_vae(embed_dim=8))
    with pytest.raises(ValueError, match="class_num"):
        MARPipeline(target=target, vae=pipe.vae, drafter=tiny_mar(class_num=6))


# ------------------------------------------------------------------------------------ CSpD


@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
def test_cspd_with_draft_equal_target_and_gamma_1_equals_the_baseline(pipe, guidance_scale):
    """Shared noises (trajectory alignment) + the same model: p == q for every token, every draft is
    accepted, and the output is the baseline's (with the last step sampled, as CSpD's tokens are)."""
    base = call(pipe, guidance_scale=guidance_scale, sample_last_step=True)
    spec = call(
        pipe,
        guidance_scale=guidance_scale,
        speculative="cspd",
        num_draft_tokens=1,
        speculative_options={"prefill_steps": 0},
    )
    assert torch.equal(spec.latents, base.latents)
    assert bool((spec.stats.token_source == SOURCE_ACCEPTED).all())
    assert spec.stats.steps == 6 and spec.stats.draft_steps == 6
    # the official baseline (last step = mean) differs from it only by that last-step noise
    assert not torch.equal(call(pipe, guidance_scale=guidance_scale).latents, base.latents)


def test_cspd_prefill_is_the_baseline_prefix(pipe):
    spec = call(pipe, speculative="cspd", num_draft_tokens=2, speculative_options={"prefill_steps": 2})
    base_steps = []
    call(pipe, sample_last_step=True, callback_on_step_end=lambda p, s, t, kw: base_steps.append(kw["tokens"].clone()))
    prefilled = spec.stats.token_source == SOURCE_PREFILL
    assert bool(prefilled.any())
    assert torch.equal(spec.latents.flatten(2).transpose(1, 2)[prefilled], base_steps[1][prefilled])
    assert bool((spec.stats.token_step[prefilled] <= 2).all())


def test_cspd_acceptance_and_stats(pipe):
    """gamma = 3 from the previous verification's state: some drafts are accepted, some resampled,
    and the stats add up (target forwards = prefill steps + one verify per draft)."""
    spec = call(pipe, num_iter=6, speculative="cspd", num_draft_tokens=3, speculative_options={"prefill_steps": 1})
    stats = spec.stats
    source = stats.token_source
    assert bool((source >= 0).all())
    accepted = int((source == SOURCE_ACCEPTED).sum())
    recovered = int((source == SOURCE_RECOVERED).sum())
    prefilled = int((source == SOURCE_PREFILL).sum())
    assert accepted > 0 and recovered > 0 and prefilled > 0
    assert accepted + recovered + prefilled == 2 * SEQ_LEN
    assert stats.steps == 1 + 2  # prefill step + 2 verifies (steps 1-3, 4-5)
    assert stats.draft_steps == 5
    assert stats.row_accepted.tolist() == (source == SOURCE_ACCEPTED).sum(1).tolist()
    assert stats.summary()["resampled_fraction"] == pytest.approx(1 - accepted / (2 * SEQ_LEN))


def test_cspd_with_another_draft_model(target):
    pipe = MARPipeline(
        target=target,
        vae=tiny_mar_vae(),
        drafter=tiny_mar(seed=3, encoder_embed_dim=16, decoder_embed_dim=16, diffloss_w=16),
    )
    pipe.set_progress_bar_config(disable=True)
    spec = call(pipe, speculative="cspd", num_draft_tokens=2)
    assert torch.isfinite(spec.latents).all() and bool((spec.stats.token_source >= 0).all())
    with pytest.raises(ValueError, match="diffusion steps"):
        MARPipeline(target=target, vae=pipe.vae, drafter=tiny_mar(num_sampling_steps="3"))(
            class_labels=[1], num_iter=4, speculative="cspd", output_type="pt"
        )


def test_cspd_reference_option_is_a_named_lossy_rule(pipe):
    exact = call(pipe, speculative="cspd", num_draft_tokens=3, speculative_options={"prefill_steps": 1})
    same = call(
        pipe,
        speculative="cspd",
        num_draft_tokens=3,
        speculative_options={"prefill_steps": 1},
        acceptance="gaussian-tempered",
        acceptance_options={"lam": 1.0},
    )
    assert torch.equal(same.latents, exact.latents)
    relaxed = call(
        pipe,
        speculative="cspd",
        num_draft_tokens=3,
        speculative_options={"prefill_steps": 1},
        acceptance="gaussian-tempered",
        acceptance_options={"lam": 42.0},
    )
    summary = relaxed.stats.summary()
    assert summary["mean_tvd_per_token"] is not None and exact.stats.summary()["mean_tvd_per_token"] is None
    assert int(relaxed.stats.row_accepted.sum()) >= int(exact.stats.row_accepted.sum())


def test_official_format_checkpoints_of_other_sizes_load(tmp_path):
    """Official-layout files of sizes the fixtures do not cover: MAR with patch size 2 and another
    buffer / depth / head count (dict config), a VAE of another width and depth (read from shapes)."""
    from mmspec.pipelines.mar import load_official_mar, load_official_vae

    fields = dict(
        img_size=64,
        vae_stride=8,
        patch_size=2,
        encoder_embed_dim=24,
        encoder_depth=3,
        encoder_num_heads=3,
        decoder_embed_dim=16,
        decoder_depth=2,
        decoder_num_heads=2,
        vae_embed_dim=3,
        class_num=7,
        buffer_size=5,
        diffloss_d=2,
        diffloss_w=24,
        num_sampling_steps="4",
    )
    mar = tiny_mar(seed=4, **fields)
    ema = {k: v + 0.01 for k, v in mar.state_dict().items()}
    torch.save({"model": mar.state_dict(), "model_ema": ema}, tmp_path / "mar.pth")
    from mmspec.pipelines.mar import MARAutoencoderKL

    torch.manual_seed(0)
    vae = MARAutoencoderKL(embed_dim=3, ch=32, ch_mult=(1, 2, 2, 1), num_res_blocks=1, attn_resolutions=(64,)).eval()
    torch.save({"model": vae.state_dict()}, tmp_path / "vae.pth")
    loaded_vae = load_official_vae(tmp_path / "vae.pth")
    assert loaded_vae.config.ch == 32 and tuple(loaded_vae.config.ch_mult) == (1, 2, 2, 1)
    assert loaded_vae.config.num_res_blocks == 1 and tuple(loaded_vae.config.attn_resolutions) == (64,)
    loaded = load_official_mar(tmp_path / "mar.pth", {**fields, "label_drop_prob": 0.1, "grad_checkpointing": False})
    assert torch.equal(loaded.state_dict()["mask_token"], ema["mask_token"])
    pipe = MARPipeline(target=loaded, vae=loaded_vae)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        class_labels=[6, 0],
        num_iter=3,
        guidance_scale=2.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.latents.shape == (2, 3, 8, 8) and out.images.shape == (2, 3, 64, 64)  # 4x4 tokens of 2x2 patches
    with torch.no_grad():
        latents = torch.randn(1, 3, 8, 8)
        assert torch.equal(loaded_vae.decode(latents), vae.decode(latents))
