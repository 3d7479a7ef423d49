"""``mmspec eval``: quality metrics and the report, on tiny components."""

from __future__ import annotations

import json

import PIL.Image
import pytest
import torch

from mmspec.app.cli import main
from mmspec.app.evaluation import EvalMethod, TorchScriptFeatures, clip_score, frechet_distance
from mmspec.pipelines.llamagen import LlamaGenPipeline

from ...conftest import tiny_llamagen


def test_frechet_distance_matches_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # N(0, I) vs N(m, I): |m|^2. N(0, 1) vs N(0, 4) in 1-D: (1 - 2)^2 = 1.
    assert frechet_distance(a, a + torch.tensor([1.0, 2.0, 0.0])) == pytest.approx(5.0, abs=1e-6)
    b = torch.randn(20000, 1, generator=g)
    assert frechet_distance(b, 2 * torch.randn(20000, 1, generator=g)) == pytest.approx(1.0, abs=0.08)
    with pytest.raises(ValueError, match="at least 2 images"):
        frechet_distance(a[:1], a)


def test_clip_score_and_method_specs():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert clip_score(x, x) == pytest.approx(100.0)
    assert clip_score(x, -x) == 0.0
    m = EvalMethod.parse("sjd:lantern:delta=0.1,k=100")
    assert (m.speculative, m.acceptance, m.acceptance_options) == ("sjd", "lantern", {"delta": 0.1, "k": 100})
    assert EvalMethod.parse("none").speculative is None
    with pytest.raises(ValueError, match="key=value"):
        EvalMethod.parse("sjd:lantern:delta")


def test_torchscript_features_from_a_user_file(tmp_path):
    net = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1)))
    net.save(str(tmp_path / "f.pt"))
    feats = TorchScriptFeatures(tmp_path / "f.pt", size=16)
    assert feats(torch.rand(2, 3, 8, 8)).shape == (2, 4) and feats.name == "torchscript:f.pt"


def test_eval_command_reports_speed_quality_and_tvd(tmp_path):
    gpt, vq = tiny_llamagen()
    LlamaGenPipeline(target=gpt, vq=vq).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tmp_path / "pipe"),
                "--method",
                "sjd",
                "--method",
                "sjd:lantern:delta=0.3,k=4,neighbour_cache=" + str(tmp_path),
                "--num-images",
                "10",
                "--batch-size",
                "5",
                "--output-dir",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    exact, lantern = report["methods"]
    assert exact["mean_tvd_per_token"] == 0 and exact["max_tvd_per_token"] == 0
    assert 0 < lantern["max_tvd_per_token"] <= 0.3 + 1e-6
    assert report["fid_noise_floor"] >= 0 and exact["fid_vs_baseline"] >= 0
    assert report["baseline"]["steps"] == 16  # 2 batches x 8 decode steps
    grid = PIL.Image.open(out / "grid.png")
    assert grid.size[1] > 3 * 6  # three rows: baseline, sjd, lantern
