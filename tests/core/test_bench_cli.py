import json

import torch

from mmspec.app.bench import BENCH_SUITES, format_table, run_benchmark
from mmspec.app.cli import main


def test_lm_suite_record_compares_methods_to_baseline_on_same_inputs():
    suite = BENCH_SUITES["lm"](
        torch.device("cpu"),
        torch.float32,
        2,
        dim=32,
        n_layer=1,
        draft_dim=16,
        vocab_size=64,
        prompt_len=16,
        max_new_tokens=12,
        num_draft_tokens=3,
    )
    record = run_benchmark(suite, torch.device("cpu"), repeats=1, warmup=0)
    names = [r["name"] for r in record["results"]]
    from mmspec.app.bench import LM_METHODS

    assert names[0].startswith("baseline") and names[1:] == LM_METHODS.names()  # every registered method
    by_name = {r["name"]: r for r in record["results"]}
    base, self_draft = by_name[names[0]], by_name["self-draft"]
    assert base["steps"] == 11 and base["mean_accepted_without_bonus"] == 0 and base["speedup_vs_baseline"] == 1.0
    # Greedy: every method must reproduce the baseline; self-drafting accepts every draft.
    assert all(r["tokens_equal_baseline"] for r in record["results"])
    assert self_draft["mean_accepted_without_bonus"] == 3 and self_draft["steps"] == 3
    assert self_draft["mean_tokens_per_step_with_bonus"] == 4
    for key in ("device", "torch", "date", "command"):
        assert record["environment"][key]
    assert "| self-draft | 3 |" in format_table(record)
    trees = BENCH_SUITES["lm"](
        torch.device("cpu"),
        torch.float32,
        1,
        dim=32,
        n_layer=1,
        draft_dim=16,
        vocab_size=64,
        prompt_len=16,
        max_new_tokens=6,
        num_draft_tokens=2,
        configs="draft-model:alternatives=3",
    )
    assert [c.name for c in trees.cases] == ["baseline (static cache, eager)", "draft-model:alternatives=3"]


def test_cli_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(
        [
            "bench",
            "--suite",
            "lm",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--output",
            str(out),
            "--option",
            "dim=32",
            "--option",
            "n_layer=1",
            "--option",
            "draft_dim=16",
            "--option",
            "vocab_size=64",
            "--option",
            "prompt_len=16",
            "--option",
            "max_new_tokens=6",
        ]
    )
    assert code == 0
    record = json.loads(out.read_text())
    assert record["suite"] == "lm" and len(record["results"]) == 4  # baseline + the three LM_METHODS
    assert "wrote" in capsys.readouterr().out
