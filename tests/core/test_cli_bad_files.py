"""Damaged model folders and impossible training / export settings get an ``error:`` line and exit
code 1, never a traceback: a truncated weights file or a malformed ``model_index.json`` is named; a
missing target folder, a batch of 0 or a negative step count stops ``train-drafter`` (and the other
training commands) before any model loads and before anything is written; an acceptance-rule option
the rule does not have stops ``generate`` before its model loads."""

from __future__ import annotations

import shutil

import pytest
import torch

from mmspec.app.cli import main
from mmspec.app.generators import assets_dir

from ..conftest import run_mmspec
from ..pipelines.vlm.test_vlm import image

#: A device name this machine does not have (no CUDA at all, or one GPU index too many).
MISSING_DEVICE = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"

NOT_SAFETENSORS = r"not a valid safetensors file \(truncated or corrupt\?"


def copy_with_truncated(tmp_path, embedded: str, weights: str):
    """A copy of the embedded model ``embedded`` (as ``tmp_path/copy``) whose ``weights`` file is cut
    to its first 100 bytes; returns the copy and the cut file."""
    copy = tmp_path / "copy"
    shutil.copytree(assets_dir() / embedded, copy)
    cut = copy / weights
    cut.write_bytes(cut.read_bytes()[:100])
    return copy, cut


def test_truncated_llamagen_weights_are_named(tmp_path):
    copy, cut = copy_with_truncated(tmp_path, "llamagen-emoji", "target/diffusion_pytorch_model.safetensors")
    with pytest.raises(SystemExit, match=rf"^error: --model {copy}: cannot read {cut}: {NOT_SAFETENSORS}") as info:
        main(["generate", "--model", str(copy), "--output-dir", str(tmp_path / "out")])
    assert info.value.code != 0


def test_truncated_mar_weights_are_named(tmp_path):
    copy, cut = copy_with_truncated(tmp_path, "mar-emoji", "target/diffusion_pytorch_model.safetensors")
    with pytest.raises(SystemExit, match=rf"^error: --model {copy}: cannot read {cut}: {NOT_SAFETENSORS}"):
        main(["generate", "--model", str(copy), "--output-dir", str(tmp_path / "out")])


def test_truncated_captioner_weights_are_named(tmp_path):
    copy, cut = copy_with_truncated(tmp_path, "captioner-emoji", "model.safetensors")
    image(0).save(tmp_path / "a.png")
    with pytest.raises(SystemExit, match=rf"^error: --model {copy}: cannot read {cut}: {NOT_SAFETENSORS}"):
        main(["caption", str(tmp_path / "a.png"), "--model", str(copy), "--output-dir", str(tmp_path / "out")])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"_class_name": "LlamaGenPipeline",', r"not valid JSON \(Expecting .* at line 1 column 36\)"),
        ('["LlamaGenPipeline"]', "holds a JSON list, not an object"),
    ],
)
def test_malformed_model_index_is_named_before_loading(tmp_path, no_model_loading, text, message):
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "model_index.json").write_text(text)
    with pytest.raises(SystemExit, match=rf"^error: --model {copy}: .*{copy / 'model_index.json'}.*{message}"):
        main(["generate", "--model", str(copy), "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_corrupt_checkpoint_is_an_error_line_not_a_traceback(tmp_path):
    copy, cut = copy_with_truncated(tmp_path, "llamagen-emoji", "vq/diffusion_pytorch_model.safetensors")
    run = run_mmspec(["generate", "--model", "copy", "--output-dir", "out"], tmp_path, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        "error: --model copy: cannot read copy/vq/diffusion_pytorch_model.safetensors: not a valid safetensors "
        "file (truncated or corrupt? Error while deserializing header: invalid header length)"
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--acceptance-option", "foo=1"], "--acceptance-option: acceptance rule 'exact' takes no options; got foo"),
        (
            ["--acceptance", "lantern", "--acceptance-option", "tau=1"],
            r"--acceptance-option: unknown option\(s\) \['tau'\] for acceptance rule 'lantern'; its options: delta, k, mode",
        ),
        (
            ["--speculative", "mulo", "--acceptance-option", "delta=0.1"],
            r"--acceptance-option: unknown option\(s\) \['delta'\] for acceptance rule 'mulo'; its options: tau, pool_size, pool, radius",
        ),
    ],
)
def test_unknown_rule_options_stop_generate_before_loading(tmp_path, no_model_loading, extra, message):
    with pytest.raises(SystemExit, match=rf"^error: {message}"):
        main(["generate", "--class-labels", "0", "--output-dir", str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out").exists()


LLAMAGEN = str(assets_dir() / "llamagen-emoji")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target-kind", "llamagen", "--target-path", "/nonexistent"], "--target-path /nonexistent: no such model"),
        (["--target-kind", "llamagen", "--target-path", "llamagen"], "--target-path llamagen: no such model folder"),
        (["--target-kind", "vlm", "--target-path", "/nonexistent"], "--target-path /nonexistent: no such model"),
        (
            ["--target-kind", "lm", "--target-path", LLAMAGEN + "/classes.json"],
            ".*/classes.json: a file, not a model folder",
        ),
        (["--target-kind", "bogus", "--target-path", LLAMAGEN], "--target-kind must be one of .*; got 'bogus'"),
        (["--target-kind", "llamagen", "--target-path", LLAMAGEN, "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--target-kind", "llamagen", "--target-path", LLAMAGEN, "--steps", "-5"], "--steps must be >= 1, got -5"),
        (["--target-kind", "llamagen", "--target-path", LLAMAGEN, "--lr", "0"], "--lr must be > 0"),
        (["--target-kind", "llamagen", "--target-path", LLAMAGEN, "--resume"], "--resume continues from --checkpoint"),
        (
            ["--target-kind", "llamagen", "--target-path", LLAMAGEN, "--arch", "eagle3"],
            "--arch eagle3 trains heads for --target-kind lm or vlm",
        ),
        (["--target-kind", "vlm", "--target-path", LLAMAGEN, "--num-queries", "0"], "--num-queries must be >= 1"),
        (["--target-kind", "lm", "--target-path", LLAMAGEN, "--prompts", "/nonexistent"], "--prompts .*no such file"),
        (["--target-kind", "llamagen", "--target-path", LLAMAGEN, "--device", MISSING_DEVICE], "--device 'cuda"),
    ],
)
def test_train_drafter_bad_settings_exit_before_loading(tmp_path, no_model_loading, extra, message):
    out = tmp_path / "head"
    with pytest.raises(SystemExit, match=rf"^error: {message}") as info:
        main(["train-drafter", "--output", str(out), "--device", "cpu", *extra])
    assert info.value.code != 0 and not out.exists()


def test_train_drafter_names_a_damaged_target(tmp_path):
    copy, cut = copy_with_truncated(tmp_path, "llamagen-emoji", "target/diffusion_pytorch_model.safetensors")
    out = tmp_path / "head"
    argv = ["train-drafter", "--target-kind", "llamagen", "--target-path", str(copy), "--output", str(out)]
    with pytest.raises(SystemExit, match=rf"^error: --target-path {copy}: cannot read {cut}: {NOT_SAFETENSORS}"):
        main([*argv, "--steps", "1", "--device", "cpu"])
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train-reference", "--vq-steps", "0"], "--vq-steps must be >= 1, got 0"),
        (["train-reference", "--stage", "mar", "--mar-vae-steps", "-1"], "--mar-vae-steps must be >= 1"),
        (["train-reference", "--threads", "0"], "--threads must be >= 1"),
        (["train-video", "--steps", "0"], "--steps must be >= 1"),
        (["train-video", "--stage", "draft", "--init-from", "/nonexistent"], "--init-from /nonexistent: no such"),
        (["train-captioner", "--steps", "0"], "--steps must be >= 1"),
        (["train-captioner", "--draft-steps", "-1"], "--draft-steps must be >= 0"),
        (["train-captioner", "--language-model", "/nonexistent"], "--language-model /nonexistent: no such folder"),
        *(
            ([command, "--device", MISSING_DEVICE], f"--device '{MISSING_DEVICE}'")
            for command in ("train-reference", "train-video", "train-captioner")
        ),
    ],
)
def test_other_training_commands_refuse_impossible_settings_first(tmp_path, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=rf"^error: {message}") as info:
        main([*argv, "--out", str(out)])
    assert info.value.code != 0 and not out.exists()


@pytest.mark.parametrize(
    ("folder", "message"),
    [
        ("/nonexistent", "/nonexistent: no such drafter folder"),
        (LLAMAGEN + "/eagle", ".*/eagle holds an EAGLE-1/2 feature head, which vLLM and SGLang cannot serve"),
    ],
)
def test_export_drafter_errors_are_error_lines(tmp_path, folder, message):
    with pytest.raises(SystemExit, match=rf"^error: {message}"):
        main(["export-drafter", folder, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
