"""Janus and Emu3 on the command line: ``mmspec generate --model FOLDER --prompt ...`` (a plain
transformers folder with its processor, or a saved pipeline with its EAGLE head), resumable batch jobs
with bad items reported, settings wrong for every item refused before the job, and
``mmspec bench --suite t2i``."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from mmspec.app.cli import main  # noqa: E402
from mmspec.pipelines.t2i import Emu3ImagePipeline, JanusImagePipeline  # noqa: E402

from . import test_emu3, test_janus  # noqa: E402


def _results(out_dir):
    return [json.loads(line) for line in (out_dir / "results.0.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def janus_folder(tmp_path_factory):
    """A plain transformers Janus folder with its processor (no model_index.json)."""
    folder = tmp_path_factory.mktemp("janus-model")
    test_janus.tiny_janus(sharpness=4.0).save_pretrained(folder)
    test_janus.tiny_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def emu3_pipeline_folder(tmp_path_factory):
    """A saved Emu3ImagePipeline (grid recorded) with its processor and an (untrained) EAGLE head."""
    folder = tmp_path_factory.mktemp("emu3-pipe")
    pipe = Emu3ImagePipeline(
        test_emu3.tiny_emu3(), height=test_emu3.H, width=test_emu3.W, processor=test_emu3.tiny_processor()
    )
    torch.manual_seed(0)
    pipe.attach_eagle_head(pipe.new_eagle_head())
    pipe.save_pretrained(folder)
    return folder


def test_generate_janus_prompts_resumes_and_matches_the_pipeline(janus_folder, tmp_path):
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n   \na cat\n")
    args = ["generate", "--model", str(janus_folder), "--prompts-file", str(prompts), "--output-dir", str(out)]
    common = ["--batch-size", "2", "--temperature", "0", "--guidance-scale", "3", "--device", "cpu"]
    assert main([*args, *common, "--speculative", "mc-sjd", "--num-draft-tokens", "4"]) == 0
    records = _results(out)
    assert [r["prompt"] for r in records] == ["a red cat", "a blue dog", "a cat"]
    assert all((out / r["file"]).is_file() for r in records)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["family"] == "janus" and stats["speculative"] == "mc-sjd"
    # The same images as the pipeline called directly (greedy, the same batches).
    pipe = JanusImagePipeline.from_pretrained(janus_folder)
    pipe.set_progress_bar_config(disable=True)
    direct = pipe(prompt=["a red cat", "a blue dog"], guidance_scale=3.0, temperature=0, output_type="np")
    import numpy as np
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out / records[0]["file"])), (direct.images[0] * 255).round())
    # A rerun resumes: nothing is generated twice.
    assert main([*args, *common, "--speculative", "mc-sjd", "--num-draft-tokens", "4"]) == 0
    assert len(_results(out)) == 3


def test_generate_emu3_saved_pipeline_with_eagle_tree(emu3_pipeline_folder, tmp_path):
    out = tmp_path / "out"
    args = ["generate", "--model", str(emu3_pipeline_folder), "--prompt", "a red cat", "--prompt", "cat"]
    extra = ["--speculative", "eagle", "--eagle-tree", "3,2,5", "--negative-prompt", "blurry", "--temperature", "0"]
    assert main([*args, "--output-dir", str(out), "--device", "cpu", "--heatmaps", *extra]) == 0
    records = _results(out)
    assert len(records) == 2 and all(r["row_steps"] >= 1 for r in records)
    from PIL import Image

    heat = Image.open(out / records[0]["heatmap"])  # one cell per generated token, ends of line included
    assert heat.size == (16 * (test_emu3.W + 1), 16 * test_emu3.H)
    assert json.loads((out / "stats.json").read_text())["family"] == "emu3"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--speculative", "draft-model"], "one of eagle, mc-sjd, sjd \\(janus models\\)"),
        (["--speculative", "eagle"], "needs an EAGLE head"),
        (["--acceptance", "greedy"], "needs greedy decoding"),
        (["--class-labels", "1,2"], "janus models take prompts"),
        (["--eagle-tree", "3,2"], "three positive integers"),
    ],
)
def test_settings_wrong_for_every_item_fail_before_the_job(janus_folder, tmp_path, extra, message):
    out = tmp_path / "out"
    args = ["generate", "--model", str(janus_folder), "--output-dir", str(out), "--device", "cpu"]
    prompts = [] if "--class-labels" in extra else ["--prompt", "a cat"]
    with pytest.raises(SystemExit, match=message):
        main([*args, *prompts, *extra])
    assert not (out / "results.0.jsonl").exists()


def test_a_folder_without_processor_or_grid_is_a_clear_error(tmp_path):
    janus = tmp_path / "janus"
    test_janus.tiny_janus().save_pretrained(janus)
    with pytest.raises(SystemExit, match="has no processor"):
        main(["generate", "--model", str(janus), "--prompt", "a cat", "--output-dir", str(tmp_path / "o1")])
    emu3 = tmp_path / "emu3"
    test_emu3.tiny_emu3().save_pretrained(emu3)
    test_emu3.tiny_processor().save_pretrained(emu3)
    with pytest.raises(SystemExit, match=r"does not record \['height', 'width'\]"):
        main(["generate", "--model", str(emu3), "--prompt", "a cat", "--output-dir", str(tmp_path / "o2")])
    out = tmp_path / "o3"
    assert (
        main(["generate", "--model", str(emu3), "--emu3-grid", "3x3", "--prompt", "a cat", "--output-dir", str(out)])
        == 0
    )


def test_bench_t2i_suite(janus_folder, tmp_path):
    record = tmp_path / "bench.json"
    args = ["bench", "--suite", "t2i", "--option", f"model={janus_folder}", "--option", "configs=sjd;mc-sjd:k=4"]
    greedy = ["--option", "temperature=0", "--option", "guidance_scale=3"]
    assert main([*args, *greedy, "--repeats", "1", "--warmup", "0", "--output", str(record), "--device", "cpu"]) == 0
    rows = json.loads(record.read_text())
    assert [case["name"] for case in rows["results"]] == ["baseline", "sjd", "mc-sjd:k=4"]
    assert all(case["tokens_equal_baseline"] for case in rows["results"])
    assert all(case["profiled_verify_s"] > 0 for case in rows["results"])  # the breakdown's profiled run
    assert rows["setup"]["pipeline"] == "JanusImagePipeline" and rows["setup"]["tokens_per_image"] == 16


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("top_k=100000", "top_k=100000 is larger than the vocabulary"),
        ("configs=sjd:nope=1", r"unknown option\(s\) \['nope'\] for speculative method 'sjd'"),
        ("configs=sjd:k=0", "config 'sjd:k=0': k must be >= 1, got 0"),
        ("configs=mc-sjd:coupling=bogus", "coupling must be one of"),
    ],
)
def test_bench_t2i_settings_wrong_for_the_model_fail_before_the_first_case(
    janus_folder, tmp_path, monkeypatch, option, message
):
    import mmspec.app.bench as bench

    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: pytest.fail("a case ran"))
    args = ["bench", "--suite", "t2i", "--option", f"model={janus_folder}", "--option", option, "--device", "cpu"]
    with pytest.raises(SystemExit, match=f"error: --suite t2i: {message}"):
        main([*args, "--output", str(tmp_path / "bench.json")])


def test_bench_t2i_settings_wrong_for_every_model_fail_before_it_loads(tmp_path, monkeypatch):
    from mmspec.pipelines.t2i import T2IPipeline

    monkeypatch.setattr(T2IPipeline, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    args = ["bench", "--suite", "t2i", "--option", f"model={tmp_path}", "--output", str(tmp_path / "bench.json")]
    with pytest.raises(SystemExit, match="error: --suite t2i: num_draft_tokens must be >= 1, got 0"):
        main([*args, "--option", "num_draft_tokens=0"])
    with pytest.raises(SystemExit, match="error: --suite t2i: temperature must be >= 0"):
        main([*args, "--option", "temperature=-1"])
