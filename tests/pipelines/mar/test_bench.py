"""``mmspec bench --suite mar``: both baselines and both CSpD rules on the same inputs."""

from __future__ import annotations

import json

import pytest
import torch

from mmspec.app.bench import BENCH_SUITES, load_suites, run_benchmark
from mmspec.app.cli import main


def test_mar_suite_record():
    load_suites()
    suite = BENCH_SUITES["mar"](
        torch.device("cpu"),
        torch.float32,
        2,
        target="random-tiny",
        drafter="random-tiny",
        num_iter=4,
        gamma=2,
        prefill_steps=1,
    )
    record = run_benchmark(suite, torch.device("cpu"), repeats=1, warmup=0)
    names = [r["name"] for r in record["results"]]
    assert names[0] == "baseline num_iter=4" and names[1] == "baseline num_iter=2"
    steps = [r["steps"] for r in record["results"]]
    assert steps[:2] == [4, 2]
    assert steps[2] == steps[3] == 1 + 2  # prefill step + verifies of steps 1-2 and 3
    for r in record["results"]:
        assert r["generated_tokens"] == 2 * 64 and r["wall_time_s_median"] > 0
    assert record["results"][0]["tokens_equal_baseline"] and not record["results"][1]["tokens_equal_baseline"]
    assert record["results"][3]["stats_summary"]["mean_tvd_per_token"] is not None  # the lossy rule reports its bound
    # CSpD's profiled run times each phase: drafting, the target's verify views, the rule and commit
    for phase in ("draft", "verify", "accept"):
        assert all(r[f"profiled_{phase}_s"] > 0 for r in record["results"][2:]), phase


def test_cli_runs_the_mar_suite(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--suite",
            "mar",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--output",
            str(out),
            "--option",
            "target=random-tiny",
            "--option",
            "num_iter=4",
            "--option",
            "gamma=2",
        ]
    )
    assert code == 0
    record = json.loads(out.read_text())
    assert record["suite"] == "mar" and len(record["results"]) == 4
    assert capsys.readouterr().out.startswith("suite `mar`, model: MAR random-tiny with draft MAR random-tiny;")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"gamma": 0}, "gamma must be >= 1, got 0"),
        ({"num_iter": 0}, "num_iter must be >= 1, got 0"),
        ({"num_iter": 6, "gamma": 4}, r"num_iter \(6\) must be a multiple of gamma \(4\)"),
    ],
)
def test_mar_settings_wrong_for_every_model_fail_before_it_loads(monkeypatch, settings, message):
    from mmspec.app import bench_mar

    monkeypatch.setattr(bench_mar, "load_default_mar", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match=message):
        load_suites()["mar"](torch.device("cpu"), torch.float32, 1, **settings)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"cfg_schedule": "cosine"}, "cfg_schedule must be 'linear' or 'constant'"),
        ({"prefill_steps": -1}, "prefill_steps must be None or an integer >= 0"),
        ({"lam": 0.5}, "lam must be >= 1"),
    ],
)
def test_mar_settings_the_pipeline_refuses_fail_before_the_first_case(settings, message):
    """Checked as the pipeline checks them, once it has loaded: the suite is never built, so no case runs."""
    with pytest.raises(ValueError, match=message):
        load_suites()["mar"](
            torch.device("cpu"), torch.float32, 1, target="random-tiny", num_iter=4, gamma=2, **settings
        )
