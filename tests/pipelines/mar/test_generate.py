"""MAR's family of ``mmspec generate`` / ``mmspec eval`` (:mod:`mmspec.app.generate_mar`) on a tiny
saved pipeline: the job (images, bad items, resume), checks before loading, the eval report."""

from __future__ import annotations

import json

import pytest

from mmspec.app.cli import main
from mmspec.app.evaluation import EvalMethod, VQEncoderFeatures
from mmspec.app.generate_mar import evaluate_mar
from mmspec.app.generators import resolve_model
from mmspec.pipelines.mar import MARPipeline

from ...conftest import tiny_mar, tiny_mar_vae


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("mar") / "pipe"
    MARPipeline(target=tiny_mar(seed=0), vae=tiny_mar_vae(), drafter=tiny_mar(seed=1)).save_pretrained(path)
    return path


def _results(out):
    return [json.loads(line) for f in sorted(out.glob("results*.jsonl")) for line in f.read_text().splitlines()]


def _generate(folder, out, labels, *extra):
    argv = ["generate", "--model", str(folder), "--class-labels", labels, "--output-dir", str(out)]
    return main([*argv, "--batch-size", "2", "--num-iter", "4", "--num-draft-tokens", "2", *extra])


def test_folders_and_names_resolve_to_the_mar_family(folder):
    assert resolve_model(str(folder)).family.name == "mar"
    assert resolve_model("mar").family.embedded == "mar-emoji"


def test_generate_job_with_bad_items_and_resume(folder, tmp_path):
    out = tmp_path / "images"
    assert _generate(folder, out, "1,x,9,3") == 0  # the default method: cspd
    assert sorted(p.name for p in out.glob("*.png")) == ["00000_class1.png", "00003_class3.png"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_results"] == 2 and stats["num_errors"] == 2 and stats["speculative"] == "cspd"
    first = {r["index"]: r for r in _results(out)}
    assert 0 <= first[0]["batch_acceptance_rate"] <= 1 and first[0]["batch_draft_steps"] >= 1
    heat = tmp_path / "heat"  # --heatmaps: which tokens were accepted drafts, resampled, pre-filled
    assert _generate(folder, heat, "1", "--heatmaps") == 0 and (heat / "00000_accept.png").is_file()
    _generate(folder, out, "1,x,9,3,2")  # resumed with one more item: only that one is generated
    assert sorted(r["index"] for r in _results(out)) == [0, 3, 4]
    with pytest.raises(SystemExit, match="settings|another job"):  # other settings in the same folder
        _generate(folder, out, "1,x,9,3,2", "--speculative", "none")
    baseline = tmp_path / "baseline"
    assert _generate(folder, baseline, "1", "--speculative", "none") == 0
    assert _results(baseline)[0]["batch_acceptance_rate"] is None and _results(baseline)[0]["batch_steps"] == 4


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num-iter", "0"], "num-iter"),
        (["--temperature", "0"], "greedy"),
        (["--top-k", "5"], "top-k"),
        (["--speculative", "sjd"], "cspd"),
        (["--acceptance", "gaussian-exact", "--acceptance-option", "nonsense"], "key=value"),
    ],
)
def test_settings_wrong_for_every_item_fail_before_loading(tmp_path, extra, message, monkeypatch):
    import mmspec.app.defaults as defaults

    monkeypatch.setattr(defaults, "load_default_mar", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match=message):
        _generate("mar", tmp_path / "out", "1", *extra)


def test_settings_wrong_for_this_model_fail_before_the_first_item(folder, tmp_path):
    with pytest.raises(SystemExit, match="exceeds"):
        _generate(folder, tmp_path / "out", "1", "--num-iter", "17")
    assert not list((tmp_path / "out").glob("*.png"))


def test_eval_report_has_both_baselines_and_fid(folder, tmp_path):
    from mmspec.app.defaults import load_mar_folder

    pipe = load_mar_folder(folder)
    pipe.set_progress_bar_config(disable=True)
    sampling = {"num_iter": 4, "num_draft_tokens": 2, "guidance_scale": 3.0, "temperature": 1.0}
    report = evaluate_mar(
        pipe,
        [EvalMethod("cspd", "cspd")],
        [0, 1, 2, 3],
        sampling,
        batch_size=2,
        features=VQEncoderFeatures(tiny_mar_vae()),  # any module with .encoder / .device / .dtype
        out_dir=tmp_path / "eval",
    )
    names = [m["method"]["name"] for m in report["methods"]]
    assert names == ["baseline num_iter=2", "cspd"]
    fewer, cspd = report["methods"]
    assert fewer["steps"] == 2 * 2 and fewer["acceptance_rate"] is None  # 2 batches x 2 forwards
    assert 0 <= cspd["acceptance_rate"] <= 1 and cspd["fid_vs_baseline"] > -1e-6  # random models: ~0
    assert (tmp_path / "eval" / "grid.png").is_file()


def test_eval_command_checks_methods_before_the_first_image(folder, tmp_path):
    argv = ["eval", "--model", str(folder), "--num-images", "2", "--num-iter", "4", "--output-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="not a MAR method"):
        main([*argv, "--method", "sjd"])
    with pytest.raises(SystemExit, match="features"):
        main([*argv, "--method", "cspd", "--features", "clip"])
