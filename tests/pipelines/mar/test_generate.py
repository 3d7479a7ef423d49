"""MAR's part of ``mmspec generate`` / ``mmspec eval`` (:mod:`mmspec.app.generate_mar`) on a tiny
saved pipeline: the job (images, bad items, resume), checks before loading, the eval report."""

from __future__ import annotations

import json

import pytest
import torch

from mmspec.app.evaluation import EvalMethod, VQEncoderFeatures
from mmspec.app.generate_mar import MARSettings, evaluate_mar, generate_mar, load_mar
from mmspec.pipelines.mar import MARPipeline

from ...conftest import tiny_mar, tiny_mar_vae


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("mar") / "pipe"
    MARPipeline(target=tiny_mar(seed=0), vae=tiny_mar_vae(), drafter=tiny_mar(seed=1)).save_pretrained(path)
    return path


def _results(out):
    return [json.loads(line) for f in sorted(out.glob("results*.jsonl")) for line in f.read_text().splitlines()]


def test_generate_job_with_bad_items_and_resume(folder, tmp_path):
    out = tmp_path / "images"
    settings = MARSettings(num_iter=4, speculative="cspd", num_draft_tokens=2)
    assert generate_mar(["1", "x", "9", "3"], out, settings, model=str(folder), batch_size=2) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["00000_class1.png", "00003_class3.png"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_results"] == 2 and stats["num_errors"] == 2
    first = {r["index"]: r for r in _results(out)}
    assert 0 <= first[0]["batch_acceptance_rate"] <= 1 and first[0]["batch_steps"] >= 1
    # resumed with one more item: the finished ones are not redone, the new one is generated
    generate_mar(["1", "x", "9", "3", "2"], out, settings, model=str(folder), batch_size=2)
    assert sorted(r["index"] for r in _results(out)) == [0, 3, 4]
    # another job's settings in the same folder are refused, not treated as done
    with pytest.raises(SystemExit, match="settings|another job"):
        generate_mar(["1", "x", "9", "3", "2"], out, MARSettings(num_iter=3), model=str(folder), batch_size=2)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (MARSettings(num_iter=0), "num_iter"),
        (MARSettings(temperature=0.0), "temperature"),
        (MARSettings(speculative="sjd"), "unknown MAR method"),
        (MARSettings(cfg_schedule="cosine"), "cfg_schedule"),
    ],
)
def test_settings_wrong_for_every_item_fail_before_loading(tmp_path, settings, message):
    with pytest.raises(SystemExit, match=message):
        generate_mar(["1"], tmp_path / "out", settings, model=str(tmp_path / "does-not-exist"))


def test_model_errors(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_mar(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "LlamaGenPipeline"}))
    with pytest.raises(ValueError, match="not a MARPipeline"):
        load_mar(str(tmp_path))
    with pytest.raises(SystemExit, match="exceeds"):
        generate_mar(["1"], tmp_path / "out", MARSettings(num_iter=17), model=str(folder))


def test_eval_report_has_both_baselines_and_fid(folder, tmp_path):
    pipe = load_mar(str(folder))
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    vq_like = tiny_mar_vae()  # any encoder with a `.encoder`, `.device`, `.dtype` serves as features
    report = evaluate_mar(
        pipe,
        [EvalMethod("cspd", "cspd")],
        [0, 1, 2, 3],
        MARSettings(num_iter=4, num_draft_tokens=2),
        batch_size=2,
        features=VQEncoderFeatures(vq_like),
        out_dir=tmp_path / "eval",
    )
    names = [m["method"]["name"] for m in report["methods"]]
    assert names == ["baseline num_iter=2", "cspd"]
    fewer, cspd = report["methods"]
    assert fewer["steps"] == 2 * 2 and fewer["acceptance_rate"] is None  # 2 batches x 2 forwards
    assert 0 <= cspd["acceptance_rate"] <= 1 and cspd["fid_vs_baseline"] > -1e-6  # random models: ~0
    assert report["fid_noise_floor"] > -1e-6
    assert (tmp_path / "eval" / "grid.png").is_file()
