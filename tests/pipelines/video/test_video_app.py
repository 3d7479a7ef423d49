"""The video family in the application: ``mmspec generate`` / ``mmspec eval`` / ``mmspec bench
--suite video`` and the image demo's video tab, on a saved tiny pipeline (the ``vlm`` scorer on the
embedded captioner, which is real and offline)."""

from __future__ import annotations

import json
import math

import numpy as np
import PIL.Image
import pytest
import torch

from mmspec.app.bench import BENCH_SUITES, load_suites, run_benchmark
from mmspec.app.cli import main
from mmspec.app.models import SDVG_FILE, VideoDefaults
from mmspec.pipelines.video import VideoPipeline

from ...conftest import REPO, tiny_video_model, tiny_video_vae


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("video") / "pipe"
    VideoPipeline(
        tiny_video_model(seed=0), tiny_video_vae(), drafter=tiny_video_model(seed=1, dim=16, depth=1)
    ).save_pretrained(folder)
    return folder


def _generate(model_dir, out, *extra):
    return main(
        [
            "generate", "--model", str(model_dir), "--class-labels", "0,panda face", "--output-dir", str(out),
            "--batch-size", "2", "--num-frames", "4", "--num-inference-steps", "2", "--guidance-scale", "1",
            "--video-scale", "1", *extra,
        ]
    )  # fmt: skip


def test_generate_writes_videos_strips_and_block_records(model_dir, tmp_path, capsys):
    out = tmp_path / "gen"
    assert _generate(model_dir, out, "--speculative", "sdvg", "--acceptance-option", "tau=-inf") == 0
    assert "share of blocks kept from the draft: 0.50" in capsys.readouterr().out  # 1 forced + 1 kept block
    records = [json.loads(line) for line in (out / "results.0.jsonl").read_text().splitlines()]
    assert [r["class_label"] for r in records] == [0, 2] and records[1]["class_name"] == "panda face"
    for record in records:
        assert (out / record["file"]).is_file() and (out / record["strip"]).is_file()
        assert record["block_sources"] == [0, 1]  # forced target block, then the kept draft
        assert record["block_scores"][0] is None and record["block_scores"][1] <= 0.0  # a log-probability
    stats = json.loads((out / "stats.json").read_text())
    assert stats["family"] == "video"
    # the same seed through the pipeline directly gives the same frames (GIF palettes aside: compare the strip size)
    assert PIL.Image.open(out / records[0]["strip"]).size[0] > 0


def test_generate_target_only_and_draft_only(model_dir, tmp_path):
    assert _generate(model_dir, tmp_path / "t", "--speculative", "none") == 0
    assert _generate(model_dir, tmp_path / "d", "--speculative", "draft-only") == 0
    record = json.loads((tmp_path / "d" / "results.0.jsonl").read_text().splitlines()[0])
    assert record["block_sources"] == [0, 1]


def test_generate_settings_errors_before_loading(model_dir, tmp_path):
    with pytest.raises(SystemExit, match="weights=/no/such/clip.pt: no such file"):
        _generate(model_dir, tmp_path / "a", "--scorer", "clip", "--scorer-option", "weights=/no/such/clip.pt")
    with pytest.raises(SystemExit, match="needs a threshold"):
        _generate(model_dir, tmp_path / "b", "--speculative", "sdvg")
    with pytest.raises(SystemExit, match="not a whole number of blocks"):
        _generate(model_dir, tmp_path / "c", "--speculative", "none", "--num-frames", "3")
    with pytest.raises(SystemExit, match="unknown; available"):
        _generate(model_dir, tmp_path / "d", "--scorer", "nope")


def test_calibrated_tau_from_the_model_folder(model_dir, tmp_path):
    (model_dir / SDVG_FILE).write_text(json.dumps({"scorer": "vlm", "aggregate": "min", "tau": math.inf}))
    try:
        out = tmp_path / "cal"
        assert _generate(model_dir, out, "--speculative", "sdvg") == 0
        record = json.loads((out / "results.0.jsonl").read_text().splitlines()[0])
        assert record["block_sources"] == [0, 2]  # tau = +inf: the draft is handed back
        job = json.loads((out / "job.json").read_text())
        assert "tau=inf" in json.dumps(job)
    finally:
        (model_dir / SDVG_FILE).unlink()


def test_model_folder_supplies_scorer_steps_and_draft_steps(model_dir, tmp_path):
    calibration = {"scorer": "vlm", "aggregate": "min", "tau": -math.inf, "num_inference_steps": 3, "draft_steps": 1}
    (model_dir / SDVG_FILE).write_text(json.dumps(calibration))
    try:
        out = tmp_path / "defaults"
        argv = ["generate", "--model", str(model_dir), "--class-labels", "0", "--output-dir", str(out),
                "--num-frames", "4", "--video-scale", "1", "--speculative", "sdvg"]  # fmt: skip
        assert main(argv) == 0
        settings = json.loads((out / "job.json").read_text())
        assert settings["scorer"] == "vlm" and settings["num_inference_steps"] == 3
        assert settings["speculative_options"] == {"draft_steps": "1"}
        # the user's settings win over the folder's
        assert main([*argv[:6], str(tmp_path / "mine"), *argv[7:], "--speculative-option", "draft_steps=2",
                     "--num-inference-steps", "2"]) == 0  # fmt: skip
        settings = json.loads((tmp_path / "mine" / "job.json").read_text())
        assert settings["num_inference_steps"] == 2 and settings["speculative_options"] == {"draft_steps": "2"}
    finally:
        (model_dir / SDVG_FILE).unlink()
    assert VideoDefaults.of(model_dir) == VideoDefaults()  # no sdvg.json: vlm, 4 steps, the drafter as many, no CFG


def test_embedded_pair_runs_with_its_calibrated_settings(tmp_path):
    calibration = json.loads((REPO / "mmspec" / "assets" / "video-emoji" / SDVG_FILE).read_text())
    out = tmp_path / "embedded"
    argv = ["generate", "--model", "video", "--class-labels", "panda face", "--output-dir", str(out),
            "--num-frames", "4", "--video-scale", "1", "--speculative", "sdvg"]  # fmt: skip
    assert main(argv) == 0
    settings = json.loads((out / "job.json").read_text())
    assert settings["scorer"] == calibration["scorer"] == "classifier"
    assert settings["num_inference_steps"] == calibration["num_inference_steps"]
    assert settings["speculative_options"] == {"draft_steps": repr(calibration["draft_steps"])}
    assert f"tau={calibration['tau']!r}" in settings["acceptance"]


def test_eval_reports_quality_next_to_speed(model_dir, tmp_path):
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(model_dir), "--num-images", "4", "--batch-size", "2", "--num-frames", "4",
            "--num-inference-steps", "2", "--guidance-scale", "1", "--output-dir", str(out),
            "--method", "sdvg::tau=inf", "--method", "sdvg::tau=-inf"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["target-only", "draft-only", "sdvg::tau=inf", "sdvg::tau=-inf"]
    assert rows["sdvg::tau=inf"]["fid_vs_target_only"] == pytest.approx(0.0, abs=1e-6)  # the same frames
    assert rows["sdvg::tau=inf"]["score_mean"] == rows["target-only"]["score_mean"]
    assert rows["sdvg::tau=-inf"]["score_mean"] == rows["draft-only"]["score_mean"]
    assert rows["sdvg::tau=-inf"]["blocks_kept"] == 4 and rows["target-only"]["fid_vs_real"] is None
    assert (out / "draft-only.gif").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--method", "sdvg:exact:tau=-1"],
            "acceptance rule 'exact' commits prefix, but speculative='sdvg' runs the block loop",
        ),
        (["--method", "sdvg::tau=-1", "--num-frames", "3"], "num_frames 3 is not a whole number of blocks"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--method", "sdvg::tau=inf", "--classes", "0,99"], r"--classes \[99\] are outside \[0, 3\)"),
    ],
)
def test_eval_settings_errors_are_messages_not_tracebacks(model_dir, tmp_path, extra, message):
    argv = ["eval", "--model", str(model_dir), "--num-images", "2", "--output-dir", str(tmp_path / "eval")]
    with pytest.raises(SystemExit, match=message):
        main([*argv, *extra])


def test_bench_suite_video(model_dir):
    load_suites()
    suite = BENCH_SUITES["video"](
        torch.device("cpu"), torch.float32, 2, model=str(model_dir), taus="inf,-inf", num_inference_steps=2
    )
    record = run_benchmark(suite, torch.device("cpu"), repeats=1, warmup=0)
    results = {r["name"]: r for r in record["results"]}
    assert results["sdvg tau=inf (vlm)"]["tokens_equal_baseline"]
    assert not results["draft-only"]["tokens_equal_baseline"]
    assert results["sdvg tau=-inf (vlm)"]["stats_summary"]["draft_blocks"] == 2 * 2


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_inference_steps": 0}, "num_inference_steps must be >= 1, got 0"),
        ({"draft_steps": -1}, "draft_steps must be >= 1, got -1"),
        ({"taus": "low"}, "taus must be numbers .inf allowed. or 'calibrated', got 'low'"),
        ({"scorer": "bogus"}, "scorer must be one of .*, got 'bogus'"),
    ],
)
def test_bench_video_settings_wrong_for_every_model_fail_before_it_loads(monkeypatch, settings, message):
    from mmspec.app import models

    monkeypatch.setattr(models, "load_video", lambda *a: pytest.fail("a model was loaded"))
    load_suites()
    with pytest.raises(ValueError, match=message):
        BENCH_SUITES["video"](torch.device("cpu"), torch.float32, 1, **settings)


def test_demo_video_tab(model_dir):
    gr = pytest.importorskip("gradio")
    from gradio_client import Client

    from mmspec.app.demos.serving import launch
    from mmspec.app.demos.video_tab import add_video_tab
    from mmspec.app.models import build_scorer

    pipe = VideoPipeline.from_pretrained(model_dir)
    pipe.set_scorer(build_scorer("vlm", {}, "cpu"))
    with gr.Blocks() as demo:
        add_video_tab(pipe, tau=-1.0, warmup=False)
    _, url, _ = launch(demo, port=None, prevent_thread_lock=True, quiet=True)
    try:
        target_gif, sdvg_gif, target_strip, sdvg_strip, summary, record = Client(url, verbose=False).predict(
            1, 3, "-inf", "min", 2, 1, api_name="/generate_video"
        )
    finally:
        demo.close()
    direct = pipe(class_labels=[1], num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="pt")
    first = np.asarray(PIL.Image.open(target_gif).convert("RGB"))
    assert first.shape[:2] == (16 * 4, 16 * 4)
    assert record["runs"]["sdvg"]["draft_blocks"] == 2 and record["runs"]["target-only"]["draft_blocks"] == 0
    assert record["runs"]["target-only"]["target_forwards"] == direct.stats.target_forwards
    assert record["num_inference_steps"] == 2 and record["draft_steps"] == 1
    assert "Speed-up" in summary and PIL.Image.open(sdvg_strip).height == PIL.Image.open(target_strip).height
