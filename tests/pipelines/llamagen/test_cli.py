"""``mmspec generate``: images + stats, bad items skipped and reported, resume, data-parallel shards."""

from __future__ import annotations

import json

import PIL.Image
import pytest

from mmspec.app import jobs
from mmspec.app.cli import main
from mmspec.pipelines.llamagen import LlamaGenPipeline

from ...conftest import run_distributed, tiny_llamagen


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    gpt, vq = tiny_llamagen()
    path = tmp_path_factory.mktemp("pipe")
    LlamaGenPipeline(target=gpt, vq=vq).save_pretrained(path)
    return path


def _run(model_dir, out, labels_file, *extra):
    return main(
        [
            "generate",
            "--model",
            str(model_dir),
            "--labels-file",
            str(labels_file),
            "--output-dir",
            str(out),
            "--batch-size",
            "2",
            "--device",
            "cpu",
            *extra,
        ]
    )


def test_generate_batch_skips_bad_items_and_resumes(model_dir, tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("1\n4\nbanana\n9\n# comment\n0\n")
    out = tmp_path / "out"
    assert _run(model_dir, out, labels, "--heatmaps") == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_results"] == 3 and stats["num_errors"] == 2
    assert {e["input"] for e in stats["errors"]} == {"banana", "9"}
    assert "outside [0, 5)" in json.dumps(stats["errors"])
    for name in ("00000_class1.png", "00001_class4.png", "00004_class0.png", "00000_accept.png"):
        assert PIL.Image.open(out / name).size[0] > 0
    first = (out / "00000_class1.png").read_bytes()
    # Resume: nothing is regenerated, errors are reported once; a longer list adds only new items.
    labels.write_text("1\n4\nbanana\n9\n# comment\n0\n2\n")
    assert _run(model_dir, out, labels) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_results"] == 4 and stats["num_errors"] == 2
    assert (out / "00000_class1.png").read_bytes() == first
    assert "1 new, 3 already done" in capsys.readouterr().out.splitlines()[-3]


def test_generate_shards_items_across_real_processes(model_dir, tmp_path):
    """Two processes started together (torchrun, what `accelerate launch` does) split the items by
    index, each writing its own results file; rank 0 summarises all of them."""
    labels = tmp_path / "labels.txt"
    labels.write_text("0\n1\n2\n3\n4\n")
    out = tmp_path / "out"
    run = run_distributed(
        ["generate", "--model", str(model_dir), "--labels-file", str(labels), "--output-dir", str(out)]
        + ["--batch-size", "2", "--speculative", "none", "--device", "cpu"],
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = {
        r["index"]: path.name
        for path in out.glob("results.*.jsonl")
        for r in map(json.loads, path.read_text().splitlines())
    }
    assert ranks == {
        0: "results.0.jsonl",
        1: "results.1.jsonl",
        2: "results.0.jsonl",
        3: "results.1.jsonl",
        4: "results.0.jsonl",
    }
    assert json.loads((out / "stats.json").read_text())["num_results"] == 5


def test_job_retries_a_failing_batch_item_by_item(tmp_path):
    def process(items):
        if any(it.value == 3 for it in items):
            raise ValueError("three is cursed")
        return [{"double": it.value * 2} for it in items]

    summary = jobs.run_job(["1", "2", "3", "4"], int, process, tmp_path, batch_size=4, desc="t")
    results = jobs.JobOutput.read(tmp_path, "results")
    assert [r["double"] for r in results] == [2, 4, 8] and summary["processed"] == 3
    assert jobs.write_summary(tmp_path, {})["errors"][0]["error"] == "three is cursed"


def test_bench_ar_image_suite_runs_every_method_on_the_same_inputs(model_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "--suite",
                "ar-image",
                "--option",
                f"source={model_dir}",
                "--option",
                "temperature=0",
                "--batch-size",
                "2",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    record = json.loads(out.read_text())
    names = [r["name"] for r in record["results"]]
    assert names[0] == "baseline (eager)" and "sjd (eager)" in names
    # Greedy: every lossless method reproduces the baseline's images token for token.
    assert all(r["tokens_equal_baseline"] for r in record["results"])
    assert record["setup"]["tokens_per_image"] == 9
    # The profiled run really is profiled (the step-time breakdown plot is drawn from it): the causal
    # loop times its verify forwards, the masked loop (MuLo-SD) its drafting.
    assert all(r["profiled_verify_s"] + r["profiled_draft_s"] > 0 for r in record["results"])
    assert capsys.readouterr().out.startswith(f"suite `ar-image`, model: {model_dir};")  # the table names the model


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("top_k=99999", "top_k=99999 is larger than the vocabulary"),
        ("num_draft_tokens=10", "num_draft_tokens=10 is more than the 9 tokens of an image: use at most 9"),
        ("configs=sjd:k=10", "num_draft_tokens=10 is more than the 9 tokens of an image"),
        ("configs=mc-sjd:coupling=bogus", "coupling must be one of"),
        ("configs=mulo", "speculative='mulo' needs the pipeline's `low_res_drafter` component"),
    ],
)
def test_bench_ar_image_settings_wrong_for_the_model_fail_before_the_first_case(
    model_dir, tmp_path, monkeypatch, option, message
):
    """Settings that need the model (its vocabulary, tokens per image, components, the method's option
    values) are refused once it has loaded, as an error line, before any case runs."""
    import mmspec.app.bench as bench

    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: pytest.fail("a case ran"))
    argv = ["bench", "--suite", "ar-image", "--option", f"source={model_dir}", "--option", option]
    with pytest.raises(SystemExit, match=f"error: --suite ar-image: .*{message}"):
        main([*argv, "--output", str(tmp_path / "bench.json")])


def test_bench_ar_image_a_rule_of_another_loop_fails_before_the_first_case(model_dir, tmp_path, monkeypatch):
    import mmspec.app.bench as bench

    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: pytest.fail("a case ran"))
    argv = ["bench", "--suite", "ar-image", "--option", f"source={model_dir}", "--option", "configs=sjd"]
    argv += ["--option", "acceptance=mulo", "--output", str(tmp_path / "bench.json")]
    with pytest.raises(SystemExit, match="acceptance rule 'mulo' commits elementwise, but speculative='sjd' runs"):
        main(argv)


def test_bench_ar_image_num_batches_times_several_images_per_run(model_dir, tmp_path):
    """``num_batches``: each timed run makes that many pipeline calls (the next class labels each), and
    the record's steps and outputs cover all of them."""
    common = ["bench", "--suite", "ar-image", "--option", f"source={model_dir}", "--option", "configs=sjd"]
    common += ["--option", "temperature=0", "--repeats", "1", "--warmup", "0", "--no-plots"]
    one, three = tmp_path / "one.json", tmp_path / "three.json"
    assert main([*common, "--output", str(one)]) == 0
    assert main([*common, "--option", "num_batches=3", "--output", str(three)]) == 0
    one, three = (json.loads(p.read_text()) for p in (one, three))
    base_one, base_three = one["results"][0], three["results"][0]
    assert three["setup"]["num_batches"] == 3 and base_three["generated_tokens"] == 3 * base_one["generated_tokens"]
    assert base_three["steps"] == 3 * base_one["steps"]  # the baseline: one step per token
    assert all(r["tokens_equal_baseline"] for r in three["results"])  # greedy SJD on three images
    with pytest.raises(SystemExit, match="num_batches must be an integer >= 1"):
        main([*common, "--option", "num_batches=0", "--output", str(tmp_path / "bad.json")])


def test_bench_ar_image_configs_with_method_options_and_rule_options(model_dir, tmp_path):
    """``configs``: chosen methods with their options and widths; ``acceptance_options`` reach the rule."""
    out = tmp_path / "bench.json"
    configs = "sjd;mc-sjd:coupling=gumbel;mc-sjd:window=cost,k=4"
    assert (
        main(
            [
                "bench",
                "--suite",
                "ar-image",
                "--option",
                f"source={model_dir}",
                "--option",
                f"configs={configs}",
                "--option",
                "acceptance=lantern",
                "--option",
                f"acceptance_options=delta=0.0,k=4,neighbour_cache={tmp_path}",
                "--option",
                "temperature=0",
                "--batch-size",
                "2",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    record = json.loads(out.read_text())
    assert [r["name"] for r in record["results"]] == [
        "baseline (eager)",
        "sjd (eager)",
        "mc-sjd:coupling=gumbel (eager)",
        "mc-sjd:window=cost,k=4 (eager)",
    ]
    assert record["results"][3]["config"]["num_draft_tokens"] == 4 and record["results"][3]["mean_draft_width"] <= 4
    assert record["setup"]["acceptance_options"]["delta"] == 0.0
    assert all(r["tokens_equal_baseline"] for r in record["results"])  # greedy + LANTERN δ = 0: lossless
    with pytest.raises(SystemExit, match="--suite ar-image: unknown speculative method 'nope'"):
        main(
            [
                "bench",
                "--suite",
                "ar-image",
                "--option",
                f"source={model_dir}",
                "--option",
                "configs=nope",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--output",
                str(out),
            ]
        )


def test_generate_passes_acceptance_options(model_dir, tmp_path):
    """--acceptance-option reaches the rule: LANTERN with delta = 0 is exact acceptance (same
    images), a large delta moves mass (other images); the options are recorded in stats.json."""
    labels = tmp_path / "labels.txt"
    labels.write_text("0\n1\n2\n3\n")
    common = ("--speculative", "sjd", "--num-draft-tokens", "4", "--seed", "5")
    assert _run(model_dir, tmp_path / "exact", labels, *common) == 0
    lantern = ("--acceptance", "lantern", "--acceptance-option", "k=8")
    assert _run(model_dir, tmp_path / "d0", labels, *common, *lantern, "--acceptance-option", "delta=0") == 0
    assert _run(model_dir, tmp_path / "d9", labels, *common, *lantern, "--acceptance-option", "delta=0.9") == 0
    names = [f"{i:05d}_class{i}.png" for i in range(4)]
    read = lambda run: [(tmp_path / run / n).read_bytes() for n in names]  # noqa: E731
    assert read("d0") == read("exact") and read("d9") != read("exact")
    assert json.loads((tmp_path / "d9" / "stats.json").read_text())["acceptance_options"] == {"k": 8, "delta": 0.9}
    with pytest.raises(SystemExit, match="expected key=value"):
        _run(model_dir, tmp_path / "bad", labels, *lantern, "--acceptance-option", "delta")


def test_generate_refuses_bad_acceptance_settings_before_any_item(tmp_path):
    """Wrong settings are the command's error, not every item's: exit with a message, write nothing."""
    gpt, vq = tiny_llamagen(grid=4)
    model = tmp_path / "pipe"
    LlamaGenPipeline(target=gpt, vq=vq).save_pretrained(model)  # no low_res_drafter / upsampler
    labels = tmp_path / "labels.txt"
    labels.write_text("0\n1\n")
    cases = [
        (("--speculative", "mulo", "--speculative-option", "upsampler=learned"), "low_res_drafter"),
        (("--speculative", "sjd", "--speculative-option", "upsampler=learned"), "unknown option"),
        (("--speculative", "sjd", "--acceptance", "mulo"), "commits elementwise"),
        (("--acceptance", "lantern", "--acceptance-option", "dleta=0.1"), "dleta"),
        (("--acceptance", "lantern", "--acceptance-option", "delta=-1"), "delta"),
    ]
    for i, (extra, message) in enumerate(cases):
        with pytest.raises(SystemExit, match=message):
            _run(model, tmp_path / f"out{i}", labels, *extra)
        assert not (tmp_path / f"out{i}" / "stats.json").exists()
