"""The recipes on a GPU (``--device cuda``): the same batches as on the CPU (data and random draws
stay on the CPU), the models on the GPU. Marked ``gpu``: run through the device tool; skipped here."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from mmspec.pipelines.llamagen import LlamaGenPipeline
from mmspec.training.captioner_cli import add_train_captioner_args, train_captioner_command
from mmspec.training.reference import add_train_reference_args, train_reference_command

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _args(add, *argv):
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(list(argv))


@pytest.mark.gpu
@requires_cuda
def test_reference_recipe_trains_on_cuda(tmp_path):
    args = _args(
        add_train_reference_args, "--preset", "tiny", "--out", str(tmp_path), "--no-progress", "--device", "cuda"
    )
    assert train_reference_command(args) == 0
    pipe = LlamaGenPipeline.from_pretrained(tmp_path / "pipeline")
    assert pipe.target.device.type == "cpu"  # saved and evaluated on the CPU, loadable anywhere
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["target_heldout_ppl"] < metrics["uniform_ppl"]


@pytest.mark.gpu
@requires_cuda
def test_captioner_recipe_trains_on_cuda(tmp_path):
    args = _args(
        add_train_captioner_args,
        "--preset",
        "tiny",
        "--out",
        str(tmp_path),
        "--no-progress",
        "--steps",
        "3",
        "--draft-steps",
        "2",
        "--device",
        "cuda",
    )
    assert train_captioner_command(args) == 0
    recipe = json.loads((tmp_path / "captioner" / "recipe.json").read_text())
    assert recipe["device"] == "cuda" and "--device cuda" in recipe["command"]
    assert json.loads((tmp_path / "eval.json").read_text())["decoding"]["draft-model"]["same_as_baseline"]
