import inspect
import json

import pytest
import torch

from mmspec.app.bench import BenchCase, BenchSuite, PeerOutput, format_table, load_suites, run_benchmark
from mmspec.app.cli import main

BENCH_SUITES = load_suites()
TINY = dict(vocab_size=64, dim=32, n_layer=2, prompt_len=16)


def test_lm_suite_record_compares_methods_and_peers_on_same_inputs():
    suite = BENCH_SUITES["lm"](torch.device("cpu"), torch.float32, 1, max_new_tokens=12, num_draft_tokens=3, **TINY)
    record = run_benchmark(suite, torch.device("cpu"), repeats=1, warmup=0)
    names = [r["name"] for r in record["results"]]
    from mmspec.pipelines.lm import LM_METHODS

    ours = [n for n in names if not n.startswith("transformers")]
    assert ours[0].startswith("baseline") and ours[1:] == [
        m for m in LM_METHODS.names() if m not in ("model", "eagle3")
    ]
    assert names[len(ours) :] == [
        "transformers generate",
        "transformers prompt lookup",
        "transformers assisted (first 2 layers)",
    ]
    by_name = {r["name"]: r for r in record["results"]}
    base, self_draft = by_name[names[0]], by_name["self-draft"]
    assert base["steps"] == 22 and base["mean_accepted_without_bonus"] == 0 and base["speedup_vs_baseline"] == 1.0
    # Greedy: every method and every transformers peer reproduces the baseline (2 prompts, batch 1).
    assert all(r["tokens_equal_baseline"] for r in record["results"]), [
        r["name"] for r in record["results"] if not r["tokens_equal_baseline"]
    ]
    assert self_draft["mean_accepted_without_bonus"] == 3 and self_draft["steps"] == 6
    assert by_name["ngram"]["compare_to"] == "transformers prompt lookup" and by_name["ngram"]["tokens_equal_peer"]
    assert base["compare_to"] == "transformers generate" and base["speedup_vs_peer"] > 0
    assert base["speedup_vs_baseline_cpu"] == 1.0 and base["speedup_vs_peer_cpu"] > 0
    assert all(r["cpu_time_s_median"] > 0 and len(r["cpu_time_s_all"]) == 1 for r in record["results"])
    assert by_name["transformers generate"]["steps"] is None  # peers have no mmspec statistics
    for key in ("device", "torch", "date", "command"):
        assert record["environment"][key]
    table = format_table(record)
    assert "| self-draft | 6 |" in table and "| transformers generate | - |" in table
    assert "Sampled" not in table  # greedy: '= baseline' is the lossless check itself
    sampled = {**record, "setup": {**record["setup"], "temperature": 1.0}}
    assert "a lossless method keeps the baseline's distribution, not its draws" in format_table(sampled)


def test_lm_suite_configs_and_bad_settings():
    suite = BENCH_SUITES["lm"](
        torch.device("cpu"), torch.float32, 2, max_new_tokens=6, num_draft_tokens=2, configs="ngram:window=cost", **TINY
    )
    assert [c.name for c in suite.cases] == [
        "baseline (static cache, eager)",
        "ngram:window=cost",
    ]  # no peers at batch 2
    with pytest.raises(ValueError, match="unknown option"):
        BENCH_SUITES["lm"](torch.device("cpu"), torch.float32, 1, configs="ngram:nope=1", **TINY)
    with pytest.raises(ValueError, match="window must be one of"):
        BENCH_SUITES["lm"](torch.device("cpu"), torch.float32, 1, configs="ngram:window=fast", **TINY)
    with pytest.raises(ValueError, match="prompts must be one of"):
        BENCH_SUITES["lm"](torch.device("cpu"), torch.float32, 1, prompts="poems", **TINY)


def test_lm_suite_configs_draft_their_own_k_against_peers_with_as_many_tokens():
    suite = BENCH_SUITES["lm"](
        torch.device("cpu"),
        torch.float32,
        1,
        max_new_tokens=12,
        num_draft_tokens=2,
        configs="ngram;ngram:k=3;self-draft:k=3;draft-model:layers=1,k=3",
        **TINY,
    )
    by_name = {c.name: c for c in suite.cases}
    assert [c.name for c in suite.cases if c.peer] == [
        "transformers generate",
        "transformers prompt lookup",
        "transformers prompt lookup k=3",
        "transformers assisted (first 1 layers) k=3",
    ]
    assert by_name["ngram"].compare_to == "transformers prompt lookup"
    assert by_name["ngram:k=3"].compare_to == "transformers prompt lookup k=3"
    assert by_name["draft-model:layers=1,k=3"].compare_to == "transformers assisted (first 1 layers) k=3"
    assert by_name["ngram:k=3"].config["num_draft_tokens"] == 3 and by_name["ngram"].config["num_draft_tokens"] == 2
    record = run_benchmark(suite, torch.device("cpu"), repeats=1, warmup=0)
    rows = {r["name"]: r for r in record["results"]}
    # The tiny LM's self-draft accepts every draft: k tokens + a bonus per step, so the steps show its k.
    assert rows["self-draft:k=3"]["mean_accepted_without_bonus"] == 3
    assert rows["transformers prompt lookup k=3"]["config"]["generate_kwargs"] == {"prompt_lookup_num_tokens": 3}
    assert all(r["tokens_equal_baseline"] for r in record["results"])
    assert all(r["tokens_equal_peer"] for r in record["results"] if r.get("compare_to"))


def test_repeats_are_interleaved_and_peer_comparisons_checked():
    order = []

    def case(name, **kw):
        def run(generator, profile, part):
            order.append(name)
            return PeerOutput(torch.zeros(1, 2, dtype=torch.long), torch.tensor([2]))

        return BenchCase(name, run, peer=True, **kw)

    suite = BenchSuite("t", "t", [case("a"), case("b", compare_to="a")])
    record = run_benchmark(suite, torch.device("cpu"), repeats=2, warmup=0)
    assert order == ["a", "b", "a", "b"]  # rounds, not one case's repeats back to back
    assert record["results"][1]["tokens_equal_peer"]
    with pytest.raises(ValueError, match="compares to 'c'"):
        run_benchmark(BenchSuite("t", "t", [case("a"), case("b", compare_to="c")]), torch.device("cpu"))


def test_rounds_interleave_parts_and_each_case_keeps_its_generator_through_them():
    calls = []

    def case(name, peer=False):
        def run(generator, profile, part):
            draw = int(torch.randint(0, 1000, (1,), generator=generator))  # the case's own stream
            calls.append((name, part, profile, draw))
            return PeerOutput(torch.tensor([[part, draw]]), torch.tensor([2]))

        return BenchCase(name, run, peer=peer)

    suite = BenchSuite("t", "t", [case("a"), case("b"), case("p", peer=True)], parts=3)
    record = run_benchmark(suite, torch.device("cpu"), repeats=2, warmup=1, seed=5)
    timed = [c[:2] for c in calls if not c[2]]
    one_round = [(name, part) for part in range(3) for name in "abp"]  # part 0 of every case, then part 1 ...
    assert timed == one_round * 3  # warm-up and two timed rounds
    assert [c[:2] for c in calls if c[2]] == [(name, part) for part in range(3) for name in "ab"]  # no peer
    # Every case draws the stream of a run on its own: seed 5, parts in order, whatever ran between.
    expected = torch.randint(0, 1000, (3,), generator=torch.Generator().manual_seed(5)).tolist()
    for name in "abp":  # warm-up, two timed rounds and (not the peer) the profiled one: each reseeded
        assert [c[3] for c in calls if c[0] == name] == expected * (3 if name == "p" else 4)
    rows = {r["name"]: r for r in record["results"]}
    assert rows["a"]["generated_tokens"] == 3 * 2 and len(rows["a"]["wall_time_s_all"]) == 2
    assert record["parts"] == 3 and all(r["tokens_equal_baseline"] for r in record["results"])
    with pytest.raises(ValueError, match="parts must be >= 1"):
        run_benchmark(BenchSuite("t", "t", [case("a")], parts=0), torch.device("cpu"))
    with pytest.raises(ValueError, match="configurations named twice: a"):  # they would share a generator
        run_benchmark(BenchSuite("t", "t", [case("a"), case("b"), case("a")]), torch.device("cpu"))


def test_assisted_peers_sharing_an_assistant_each_set_their_number_of_tokens():
    from types import SimpleNamespace

    from mmspec.app.bench_text import _assisted_peer

    seen = []

    class Target:  # transformers' generate, reading the assistant's config as it does when it runs
        def generate(self, input_ids, attention_mask, assistant_model, **kwargs):
            seen.append(assistant_model.generation_config.num_assistant_tokens)
            return torch.cat([input_ids, torch.ones(1, 2, dtype=torch.long)], 1)

    assistant = SimpleNamespace(generation_config=SimpleNamespace())
    prompts = [torch.zeros(1, 3, dtype=torch.long)]
    three = _assisted_peer("k3", Target(), assistant, prompts, 2, (9,), 0, 3, assistant_layers=1)
    five = _assisted_peer("k5", Target(), assistant, prompts, 2, (9,), 0, 5)
    for case in (three, five, three):
        assert case.run(None, False, 0).tokens.tolist() == [[1, 1]]
    assert seen == [3, 5, 3] and assistant.generation_config.num_assistant_tokens_schedule == "constant"
    assert three.peer and three.config == {"num_assistant_tokens": 3, "schedule": "constant", "assistant_layers": 1}


def test_cli_bench_writes_json_and_plots(tmp_path, capsys):
    out = tmp_path / "r.json"
    options = [f"--option={k}={v}" for k, v in {**TINY, "max_new_tokens": 6, "configs": "ngram;self-draft"}.items()]
    code = main(["bench", "--suite", "lm", "--repeats", "1", "--warmup", "0", "--output", str(out), *options])
    assert code == 0
    record = json.loads(out.read_text())
    assert record["suite"] == "lm" and len(record["results"]) == 5  # baseline, 2 methods, generate, prompt lookup
    assert all(r["profiled_verify_s"] > 0 for r in record["results"] if not r["peer"])
    for name in ("r-speedup.png", "r-steps.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "wrote" in printed
    # The table's header names the model: here the random-weight Llama the suite builds without model=.
    assert printed.startswith("suite `lm`, model: random-weight Llama (vocab 64, dim 32, 2 layers")


def test_unknown_suite_options_are_named_with_the_suites_settings(tmp_path):
    with pytest.raises(SystemExit, match=r"--option foo: not a setting of suite 'lm'; its settings: .*max_new_tokens"):
        main(["bench", "--suite", "lm", "--option", "foo=1", "--output", str(tmp_path / "r.json")])


def _never_load(*args, **kwargs):
    raise AssertionError("a model was loaded")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--repeats", "0"], "error: --repeats must be >= 1, got 0"),
        (["--warmup", "-1"], "error: --warmup must be >= 0, got -1"),
        (["--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
        (["--threads", "0"], "error: --threads must be >= 1, got 0"),
    ],
)
def test_flags_wrong_for_every_suite_fail_before_any_model_loads(monkeypatch, tmp_path, flags, message):
    monkeypatch.setitem(BENCH_SUITES, "lm", _never_load)
    with pytest.raises(SystemExit, match=message):
        main(["bench", "--suite", "lm", *flags, "--output", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("temperature=hot", "error: --option temperature: must be a number, got 'hot'"),
        ("num_draft_tokens=abc", "error: --option num_draft_tokens: must be an integer, got 'abc'"),
        ("top_k=1.5", r"error: --option top_k: must be an integer or null, got 1\.5"),
        ("compile=maybe", "error: --option compile: must be true or false, got 'maybe'"),
        ("num_draft_tokens=-2", "error: --suite ar-image: num_draft_tokens must be >= 1, got -2"),
        ("guidance_scale=-1", "error: --suite ar-image: guidance_scale must be >= 0"),
        ("configs=sjd:foo=1", r"error: --suite ar-image: unknown option\(s\) \['foo'\] for speculative method 'sjd'"),
        ("configs=sjd:k=-1", "error: --suite ar-image: config 'sjd:k=-1': k must be >= 1, got -1"),
        ("configs=sjd;bogus", "error: --suite ar-image: unknown speculative method 'bogus'"),
    ],
)
def test_ar_image_settings_wrong_for_every_model_fail_before_it_loads(monkeypatch, tmp_path, option, message):
    from mmspec.app import bench_llamagen

    monkeypatch.setattr(bench_llamagen, "_pipeline", _never_load)
    with pytest.raises(SystemExit, match=message):
        main(["bench", "--suite", "ar-image", "--option", option, "--output", str(tmp_path / "r.json")])


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("num_draft_tokens=0", "num_draft_tokens must be >= 1, got 0"),
        ("max_new_tokens=0", "max_new_tokens must be >= 1, got 0"),
        ("dim=0", "dim must be >= 1, got 0"),
        ("dim=100", "dim=100 does not split into 3 attention heads"),
        ("n_layer=0", "n_layer must be >= 1, got 0"),
        ("prompt_len=0", "prompt_len must be >= 1, got 0"),
        ("configs=ngram:nope=1", r"unknown option\(s\) \['nope'\] for speculative method 'ngram'"),
        ("peers=maybe", "error: --option peers: must be true or false, got 'maybe'"),
    ],
)
def test_lm_settings_wrong_for_every_model_fail_before_it_loads(monkeypatch, tmp_path, option, message):
    from mmspec.app import bench_text

    monkeypatch.setattr(bench_text, "_tiny_lm", _never_load)
    with pytest.raises(SystemExit, match=message):
        main(["bench", "--suite", "lm", "--option", option, "--output", str(tmp_path / "r.json")])


def test_option_types_follow_every_suites_settings():
    from mmspec.app.bench import typed_options

    ar_image = BENCH_SUITES["ar-image"]
    assert typed_options(ar_image, {"temperature": 0, "top_k": None, "compile": True}) == {
        "temperature": 0.0,
        "top_k": None,
        "compile": True,
    }
    assert typed_options(BENCH_SUITES["video"], {"taus": -3.5}) == {"taus": "-3.5"}  # a number as a text setting
    # Every setting of every suite has a type the check knows: a list fits none of them.
    for factory in BENCH_SUITES.values():
        for setting in list(inspect.signature(factory).parameters)[3:]:
            with pytest.raises(ValueError, match=f"--option {setting}: must be"):
                typed_options(factory, {setting: []})


@pytest.mark.parametrize(
    ("suite", "options"),
    [
        ("ar-image", ["source=/nonexistent/pipe"]),
        ("lm", ["model=/nonexistent/pipe"]),
        ("vlm", ["model=/nonexistent/pipe", "images=/nonexistent/images"]),
        ("t2i", ["model=/nonexistent/pipe"]),
        ("video", ["model=/nonexistent/pipe"]),
        ("mar", ["target=/nonexistent/pipe"]),
    ],
)
def test_a_missing_model_folder_is_named_not_taken_for_a_hub_id(tmp_path, suite, options):
    flags = [f"--option={o}" for o in options]
    with pytest.raises(SystemExit, match=rf"--suite {suite}: --option \w+=/nonexistent/pipe: no such folder"):
        main(["bench", "--suite", suite, *flags, "--output", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()
