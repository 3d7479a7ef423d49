"""Reference-model recipes (mmspec.training.reference) and the embedded default (mmspec.app.defaults)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil

import pytest
import torch

from mmspec.app.defaults import default_llamagen_classes, default_llamagen_path, load_default_llamagen
from mmspec.pipelines.llamagen import LlamaGenPipeline
from mmspec.training.loop import latest_checkpoint
from mmspec.training.reference import add_train_reference_args, reference_configs, train_reference_command
from mmspec.training.reference_data import render_images, to_model_range, tokenize_images
from mmspec.training.reference_gpt import gpt_training_loss, train_c2i_gpt
from mmspec.training.reference_vq import build_vq, train_vq, vq_training_losses


@pytest.fixture(scope="module")
def tiny():
    """The ``tiny`` preset (16-px images, 4 classes), progress bars off."""
    return tuple(dataclasses.replace(c, progress=False) for c in reference_configs("tiny").values())


@pytest.fixture(scope="module")
def tiny_vq(tiny):
    with torch.enable_grad():
        return train_vq(tiny[0])


def test_vq_training_reduces_reconstruction_loss(tiny):
    config = dataclasses.replace(tiny[0], steps=12)
    images = to_model_range(render_images(config.data)[0][:16])
    torch.manual_seed(config.seed)
    before = vq_training_losses(build_vq(config), images)
    after = vq_training_losses(train_vq(config), images)
    assert after.reconstruction < 0.8 * before.reconstruction
    assert after.indices.unique().numel() > 4  # the codebook is in use, not collapsed


def test_gpt_training_reduces_cross_entropy(tiny, tiny_vq):
    config = dataclasses.replace(tiny[1], steps=12, lr=3e-3)
    images, labels = render_images(config.data)
    tokens = tokenize_images(tiny_vq, images)
    uniform = torch.log(torch.tensor(float(tiny_vq.config.codebook_size)))
    gpt = train_c2i_gpt(tiny_vq, config, tokens)
    assert gpt_training_loss(gpt, labels, tokens) < uniform - 0.3  # the zero-init head starts uniform


@pytest.mark.parametrize("stage", ["vq", "gpt"])
def test_resume_from_checkpoint_matches_uninterrupted_run(tiny, tiny_vq, tmp_path, stage):
    def train(checkpoint_dir, resume):
        if stage == "vq":
            config = dataclasses.replace(tiny[0], checkpoint_dir=str(checkpoint_dir), resume=resume)
            return train_vq(config)
        config = dataclasses.replace(tiny[1], checkpoint_dir=str(checkpoint_dir), resume=resume)
        return train_c2i_gpt(tiny_vq, config)

    full = train(tmp_path / "full", resume=False)
    assert latest_checkpoint(tmp_path / "full").name == "step-0000004.pt"
    # An "interrupted" run: only the step-2 checkpoint exists (VQ: after its first code restart).
    (tmp_path / "cut").mkdir()
    shutil.copy(tmp_path / "full" / "step-0000002.pt", tmp_path / "cut")
    resumed = train(tmp_path / "cut", resume=True)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_refuses_other_settings(tiny, tmp_path):
    train_vq(dataclasses.replace(tiny[0], steps=2, checkpoint_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="different settings"):
        train_vq(dataclasses.replace(tiny[0], steps=2, lr=1.0, checkpoint_dir=str(tmp_path), resume=True))


def _parse(*argv):
    parser = argparse.ArgumentParser()
    add_train_reference_args(parser)
    return parser.parse_args(list(argv))


def test_cli_runs_a_tiny_stage(tmp_path):
    with pytest.raises(SystemExit, match="run --stage vq first"):
        train_reference_command(_parse("--stage", "gpt", "--preset", "tiny", "--out", str(tmp_path), "--no-progress"))
    assert (
        train_reference_command(_parse("--stage", "vq", "--preset", "tiny", "--out", str(tmp_path), "--no-progress"))
        == 0
    )
    assert (tmp_path / "vq" / "config.json").is_file()
    assert latest_checkpoint(tmp_path / "checkpoints" / "vq") is not None


def test_cli_trains_every_stage_into_a_pipeline_with_a_low_resolution_drafter_and_upsampler(tmp_path):
    assert train_reference_command(_parse("--preset", "tiny", "--out", str(tmp_path), "--no-progress")) == 0
    pipe = LlamaGenPipeline.from_pretrained(tmp_path / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.target.grid_size == 8 and pipe.drafter.grid_size == 8
    assert pipe.low_res_drafter.grid_size == 4  # half the image side, same VQ codebook
    assert pipe.low_res_drafter.vocab_size == pipe.target.vocab_size
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert 1 < metrics["low_res_drafter_heldout_ppl"] < 1.5 * metrics["uniform_ppl"]
    recipe = json.loads((tmp_path / "pipeline" / "recipe.json").read_text())
    assert recipe["low-res-draft"]["data"]["image_size"] == recipe["gpt"]["data"]["image_size"] // 2
    out = pipe(
        class_labels=[0, 1],
        speculative="mulo",
        acceptance="mulo",
        acceptance_options={"tau": 0.01},
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    assert out.tokens.shape == (2, 8, 8) and int(out.stats.row_accepted.sum()) > 0
    assert pipe.upsampler.config.scale == 2 and pipe.upsampler.vocab_size == pipe.target.vocab_size
    assert (
        0 <= metrics["upsampler_heldout_accuracy"] <= 1 and 0 <= metrics["decode_resize_encode_heldout_accuracy"] <= 1
    )
    # tau = 0 keeps every candidate: the output is the up-sampler's grid, which differs per up-sampler
    grids = {
        name: pipe(
            class_labels=[0, 1],
            speculative="mulo",
            acceptance="mulo",
            acceptance_options={"tau": 0.0},
            speculative_options={"upsampler": name},
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).tokens
        for name in ("learned", "decode-resize-encode")
    }
    assert grids["learned"].shape == (2, 8, 8) and not torch.equal(grids["learned"], grids["decode-resize-encode"])


@pytest.fixture(scope="module")
def default_pipe():
    pipe = load_default_llamagen()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_default_assets_are_small_and_complete():
    path = default_llamagen_path()
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 30 * 2**20
    assert (path / "MODEL_CARD.md").is_file()
    assert all(
        (path / part / "config.json").is_file() for part in ("target", "vq", "drafter", "low_res_drafter", "upsampler")
    )
    classes = default_llamagen_classes()
    assert [c["label"] for c in classes] == list(range(len(classes)))


def test_default_model_generates_a_non_degenerate_image(default_pipe):
    out = default_pipe(
        class_labels=[0], guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="pt"
    )
    image = out.images[0]
    assert image.shape == (3, 32, 32)
    assert image.std() > 0.1  # not a flat colour
    assert out.tokens.unique().numel() >= 8


@pytest.mark.parametrize("method", ["sjd", "draft-model"])
def test_default_model_greedy_speculation_equals_baseline(default_pipe, method):
    common = {"class_labels": [0, 5], "guidance_scale": 3.0, "temperature": 0.0, "output_type": "pt"}
    baseline = default_pipe(**common)
    spec = default_pipe(**common, speculative=method, num_draft_tokens=4)
    assert torch.equal(baseline.tokens, spec.tokens)
    assert spec.stats.steps < baseline.stats.steps
