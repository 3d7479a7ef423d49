"""Bad input to ``mmspec generate`` / ``mmspec caption`` gets a clear answer: settings wrong for every
item stop the command before any model loads (exit code 1 and the message); an over-limit image
(a decompression bomb) is a reported bad item; captions appear while the job runs. Plus the
newcomer's first contact: ``--version``, a fast ``--help`` that shows every default."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib

import pytest
import torch

from mmspec.app import cli
from mmspec.app.cli import main

from ..conftest import CLI_ENV, run_mmspec
from ..pipelines.vlm.test_vlm import image, tiny_vlm


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--top-k", "0"], "top_k must be a positive integer"),
        (["--num-draft-tokens", "0"], "--num-draft-tokens must be >= 1 with --speculative sjd"),
        (["--speculative", "bogus"], "--speculative must be 'none' .* got 'bogus'"),
        (["--guidance-scale", "-1"], "guidance_scale must be >= 0"),
        (["--top-p", "1.5"], r"top_p must be in \(0, 1\]"),
        (["--acceptance", "nope"], "--acceptance must be one of"),
        (["--acceptance", "greedy"], "needs greedy decoding: add --temperature 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--eagle-tree", "3,2"], "--eagle-tree must be three positive integers"),
        (["--model", "/nonexistent/pipe"], "--model /nonexistent/pipe: no such folder"),
        (["--eagle-head", "/nonexistent/head"], "--eagle-head /nonexistent/head: no such folder"),
        (
            ["--speculative", "mulo", "--acceptance", "lantern"],
            "commits prefix, but --speculative mulo runs the masked",
        ),
        (["--speculative-option", "tau=1"], r"unknown option\(s\) \['tau'\] for speculative method 'sjd'"),
        (["--speculative", "none", "--speculative-option", "init=copy"], "--speculative-option needs a --speculative"),
    ],
)
def test_generate_bad_settings_exit_before_loading(tmp_path, no_model_loading, extra, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=message) as exit_info:
        main(["generate", "--class-labels", "0,1", "--output-dir", str(out), *extra])
    assert exit_info.value.code != 0 and not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-new-tokens", "-3"], "--max-new-tokens must be >= 1"),
        (["--num-draft-tokens", "0"], "--num-draft-tokens must be >= 1 with a drafter"),
        (["--drafter", "medusa"], "--drafter must be one of"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--max-image-side", "0"], "--max-image-side must be >= 1"),
    ],
)
def test_caption_bad_settings_exit_before_loading(tmp_path, no_model_loading, extra, message):
    image(0).save(tmp_path / "a.png")
    (tmp_path / "model").mkdir()  # exists, so the setting under test is what stops the command
    with pytest.raises(SystemExit, match=message):
        main(
            [
                "caption",
                str(tmp_path),
                "--model",
                str(tmp_path / "model"),
                "--output-dir",
                str(tmp_path / "out"),
                *extra,
            ]
        )
    assert not (tmp_path / "out").exists()


def test_bad_setting_is_a_nonzero_exit_with_the_message_on_stderr(tmp_path):
    run = run_mmspec(["caption", str(tmp_path), "--max-new-tokens", "-3"], tmp_path)
    assert run.returncode == 1 and run.stderr.strip() == "error: --max-new-tokens must be >= 1, got -3"


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    model, processor = tiny_vlm("llava")
    path = tmp_path_factory.mktemp("llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_caption_limits_of_the_model_stop_the_job_before_any_image(vlm_dir, tmp_path):
    image(0).save(tmp_path / "a.png")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="max_new_tokens=100000 is more than the model's .* positions"):
        main(
            [
                "caption",
                str(tmp_path),
                "--model",
                str(vlm_dir),
                "--output-dir",
                str(out),
                "--max-new-tokens",
                "100000",
                "--device",
                "cpu",
            ]
        )
    with pytest.raises(SystemExit, match="top_k=100000 is larger than the vocabulary"):
        main(
            [
                "caption",
                str(tmp_path),
                "--model",
                str(vlm_dir),
                "--output-dir",
                str(out),
                "--top-k",
                "100000",
                "--device",
                "cpu",
            ]
        )
    assert not list(out.glob("*.jsonl"))


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels (a decompression bomb as the
    header shows it; no pixel data, so the test stays small and fast)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def test_caption_reports_a_decompression_bomb_and_shows_captions_mid_job(vlm_dir, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        image(i).save(folder / f"{i}.png")
    (folder / "2b_bomb.png").write_bytes(png_header(20000, 20000))
    image(9, (40, 30)).save(folder / "3b_wide.png")
    out = tmp_path / "out"
    # Images are decoded a batch at a time: when batch 2 decodes, batch 1's captions are on disk.
    from mmspec.app import jobs_io

    decoded, visible = [], []
    real_load = jobs_io.load_image

    def load(path, max_side):
        decoded.append(os.path.basename(path))
        visible.append(
            len((out / "captions.jsonl").read_text().splitlines()) if (out / "captions.jsonl").exists() else 0
        )
        return real_load(path, max_side)

    monkeypatch.setattr(jobs_io, "load_image", load)
    assert (
        main(
            [
                "caption",
                str(folder),
                "--model",
                str(vlm_dir),
                "--output-dir",
                str(out),
                "--batch-size",
                "2",
                "--max-new-tokens",
                "4",
                "--drafter",
                "none",
                "--max-image-side",
                "32",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert decoded == ["0.png", "1.png", "2.png", "3.png"] and visible == [0, 0, 2, 2]
    stats = json.loads((out / "stats.json").read_text())
    errors = {os.path.basename(e["input"]): e["error"] for e in stats["errors"]}
    assert errors.keys() == {"2b_bomb.png", "3b_wide.png"}
    assert "20000x20000 pixels; the limit is 32 pixels a side (--max-image-side)" in errors["2b_bomb.png"]
    assert "30x40" in errors["3b_wide.png"]
    captions = [json.loads(line)["image"] for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [os.path.basename(c) for c in captions] == ["0.png", "1.png", "2.png", "3.png"]
    assert "skipped item" in capsys.readouterr().out


def test_version_and_help_show_defaults(tmp_path):
    run = run_mmspec(["--version"], tmp_path)
    from mmspec import __version__

    assert run.returncode == 0 and run.stdout.strip() == f"mmspec {__version__}"
    for name in cli.COMMANDS:
        if name.startswith("train-"):
            continue  # their arguments are covered by the training tests
        parser = cli.build_parser([name])
        sub = next(a for a in parser._actions if isinstance(a, cli.argparse._SubParsersAction)).choices[name]
        text = sub.format_help()
        with_defaults = [
            a for a in sub._actions if a.option_strings and a.default not in (None, False, cli.argparse.SUPPRESS)
        ]
        for action in with_defaults:
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            assert "default" in cli.HelpFormatter("x")._get_help_string(action).lower(), (name, action.option_strings)
        assert "(default: " in text or not with_defaults, name


def test_help_does_not_import_torch():
    """`mmspec --help` and `mmspec caption --help` start without torch, diffusers or transformers."""
    code = (
        "import sys, contextlib, io\nfrom mmspec.app.cli import main\n"
        "for argv in (['--help'], ['caption', '--help'], ['generate', '--help']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        main(argv)\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=CLI_ENV, cwd="/", timeout=60, check=False
    )
    assert run.stdout.strip() == "[]", run.stderr[-2000:]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--class-labels", ""], "nothing to generate: give class labels"),  # not the default labels
        (["--device", "cuda:99" if torch.cuda.is_available() else "cuda"], "--device 'cuda"),
        (["--device", "nodevice"], "--device 'nodevice' is not a device name"),
    ],
)
def test_generate_empty_labels_and_missing_devices_exit_before_loading(tmp_path, no_model_loading, extra, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=message) as exit_info:
        main(["generate", "--output-dir", str(out), *extra])
    assert exit_info.value.code != 0 and not out.exists()


def test_an_output_dir_that_is_a_file_is_an_error(tmp_path, no_model_loading):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    with pytest.raises(SystemExit, match="--output-dir .*taken is a file, not a folder"):
        main(["generate", "--class-labels", "0", "--output-dir", str(taken)])
    assert taken.read_text() == "keep me"


def test_caption_rules_of_other_loops_and_empty_inputs_exit_before_loading(tmp_path, no_model_loading):
    image(0).save(tmp_path / "a.png")
    out = tmp_path / "out"
    for rule in ("gaussian-exact", "elementwise-exact", "mulo", "score-threshold"):
        with pytest.raises(SystemExit, match="--acceptance must be one of exact, greedy, gsd, lantern"):
            main(["caption", str(tmp_path / "a.png"), "--acceptance", rule, "--output-dir", str(out)])
    assert not out.exists()  # nothing recorded, so the corrected rerun is not refused as "other settings"
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images in .*empty"):
        main(["caption", str(tmp_path / "empty")])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--classes", "a,b"], "--classes must be comma-separated class ids, got 'a,b'"),
        (
            ["--features", "torchscript:/nonexistent/inception.pt"],
            "--features torchscript:/nonexistent/.*: no such file",
        ),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_eval_bad_settings_name_their_flag_before_loading(tmp_path, no_model_loading, extra, message):
    with pytest.raises(SystemExit, match=message):
        main(["eval", "--output-dir", str(tmp_path / "out"), *extra])


def test_command_summaries_in_help_are_whole_sentences():
    run = run_mmspec(["--help"], timeout=60, check=True)
    text = " ".join(run.stdout.split())
    assert "resumable; bad items skipped and reported)." in text
    assert "for VLMs; progress, checkpoints, resume." in text


def test_help_shows_no_empty_defaults(capsys):
    """An option whose default is the empty string (``--negative-prompt``) shows no ``(default: )``."""
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "negative prompt (default: empty)" in text and "(default: )" not in text
    assert "(default: 0)" in text  # a falsy default that is a value (--seed 0) still shows
