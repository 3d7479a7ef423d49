"""The MAR reference pair's recipe (mmspec.training.reference_mar) and the embedded pair
(mmspec/assets/mar-emoji)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil

import pytest
import torch

from mmspec.app.defaults import default_mar_classes, default_mar_path, load_default_mar, load_mar_folder
from mmspec.training.loop import latest_checkpoint
from mmspec.training.reference import add_train_reference_args, train_reference_command
from mmspec.training.reference_data import render_images
from mmspec.training.reference_mar import (
    TrainingDiffusion,
    build_mar,
    encode_moments,
    heldout_mar_loss,
    mar_reference_configs,
    train_mar,
    train_mar_vae,
)


@pytest.fixture(scope="module")
def tiny():
    return {k: dataclasses.replace(c, progress=False) for k, c in mar_reference_configs("tiny").items()}


@pytest.fixture(scope="module")
def tiny_vae(tiny):
    return train_mar_vae(tiny["mar-vae"])


def _parse(*argv):
    parser = argparse.ArgumentParser()
    add_train_reference_args(parser)
    return parser.parse_args(list(argv))


def test_vae_sets_its_latent_scale(tiny, tiny_vae):
    images, _ = render_images(tiny["mar-vae"].data)
    means = encode_moments(tiny_vae, images)[:, 0]
    assert (means * tiny_vae.config.scaling_factor).std() == pytest.approx(1.0, rel=1e-3)


def test_mar_training_reduces_the_diffusion_loss(tiny, tiny_vae):
    config = dataclasses.replace(tiny["mar-target"], steps=30, lr=3e-3)
    images, labels = render_images(config.data)
    moments = encode_moments(tiny_vae, images)
    scale = tiny_vae.config.scaling_factor
    torch.manual_seed(config.seed)
    before = heldout_mar_loss(build_mar(config, tiny_vae), moments, labels, scale)
    after = heldout_mar_loss(train_mar(tiny_vae, config, moments), moments, labels, scale)
    assert after < 0.9 * before


def test_hybrid_loss_at_t0_is_the_decoder_likelihood():
    """Rows at t = 0 take the discretised likelihood, the others the KL; both finite."""
    diffusion = TrainingDiffusion()
    torch.manual_seed(0)
    net = build_mar(dataclasses.replace(mar_reference_configs("tiny")["mar-target"]), _vae4()).diffloss.net
    x0, cond = torch.randn(6, 4) * 0.5, torch.randn(6, 32)
    loss = diffusion.loss(net, x0, cond, torch.tensor([0, 0, 1, 500, 998, 999]), torch.randn(6, 4))
    assert loss.shape == (6,) and bool(torch.isfinite(loss).all())


def _vae4():
    from mmspec.pipelines.mar import MARAutoencoderKL

    return MARAutoencoderKL(embed_dim=4, ch=32, ch_mult=(1, 2, 2), attn_resolutions=(), resolution=16)


def test_resume_matches_uninterrupted_run(tiny, tiny_vae, tmp_path):
    def train(directory, resume):
        config = dataclasses.replace(tiny["mar-draft"], checkpoint_dir=str(directory), resume=resume)
        return train_mar(tiny_vae, config)

    full = train(tmp_path / "full", resume=False)
    assert latest_checkpoint(tmp_path / "full").name == "step-0000004.pt"
    (tmp_path / "cut").mkdir()
    shutil.copy(tmp_path / "full" / "step-0000002.pt", tmp_path / "cut")
    resumed = train(tmp_path / "cut", resume=True)  # the EMA is restored too
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_cli_trains_the_pair_into_a_pipeline(tmp_path):
    with pytest.raises(SystemExit, match="run --stage mar-vae first"):
        train_reference_command(_parse("--stage", "mar-target", "--preset", "tiny", "--out", str(tmp_path)))
    argv = ("--stage", "mar", "--preset", "tiny", "--out", str(tmp_path), "--no-progress", "--save-dtype", "float16")
    assert train_reference_command(_parse(*argv)) == 0
    pipe = load_mar_folder(tmp_path / "mar-pipeline")
    assert (
        pipe.target.dtype == torch.float32
        and pipe.drafter.config.encoder_embed_dim < pipe.target.config.encoder_embed_dim
    )
    metrics = json.loads((tmp_path / "mar-eval.json").read_text())
    assert metrics["generation"]["cspd"]["target_forwards"] < metrics["generation"]["baseline"]["target_forwards"]
    recipe = json.loads((tmp_path / "mar-pipeline" / "recipe.json").read_text())
    assert recipe["mar-target"]["data"] == recipe["mar-vae"]["data"] and "checkpoint_dir" not in recipe["mar-draft"]
    classes = json.loads((tmp_path / "mar-pipeline" / "classes.json").read_text())
    assert len(classes) == pipe.target.config.class_num


needs_assets = pytest.mark.skipif(
    not (default_mar_path() / "model_index.json").is_file(), reason="the embedded MAR pair is not built"
)


@needs_assets
def test_embedded_pair_is_small_and_complete():
    path = default_mar_path()
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 8 * 2**20
    assert (path / "README.md").is_file() and (path / "recipe.json").is_file()
    classes = default_mar_classes()
    assert [c["label"] for c in classes] == list(range(len(classes)))


@needs_assets
def test_embedded_pair_draws_images_and_runs_cspd():
    """Non-degenerate images from both models; CSpD's forward count. (The pair does not agree under
    the exact rule, acceptance ~0: see the model card; this test does not pretend otherwise.)"""
    pipe = load_default_mar()
    pipe.set_progress_bar_config(disable=True)
    common = {"class_labels": [0, 5], "num_iter": 8, "generator": None, "output_type": "pt"}
    base = pipe(**{**common, "generator": torch.Generator().manual_seed(0)})
    spec = pipe(**{**common, "generator": torch.Generator().manual_seed(0)}, speculative="cspd", num_draft_tokens=2)
    for out in (base, spec):
        assert out.images.shape == (2, 3, 32, 32) and float(out.images.std()) > 0.1
        assert float(out.latents.abs().max()) <= pipe.target.config.clip_denoised + 1.0  # no diverged trajectory
    assert base.stats.steps == 8 and spec.stats.steps == 1 + 4  # pre-fill + one verify per 2 drafted steps
    assert 0.0 <= spec.stats.draft_acceptance_rate <= 1.0
