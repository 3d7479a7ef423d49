"""Checks of the training commands' settings (``mmspec train-drafter``, ``train-reference``,
``train-video``, ``train-captioner``; ``export-drafter`` uses :func:`check_folder`), made first thing
in each command, before any model loads or any data is rendered: a path that is not there or a count
that cannot work is the command's error (a message prefixed ``error:``, exit code 1), not a traceback
from deep inside a library after minutes of set-up, nor, for a count of steps below one, an untrained
model written as if it were trained.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_at_least(args: argparse.Namespace, minimums: dict[str, int]) -> None:
    """Each option named (by ``dest``) in ``minimums`` that is set must be at least its minimum."""
    for dest, minimum in minimums.items():
        value = getattr(args, dest, None)
        if value is not None and value < minimum:
            _fail(f"{_flag(dest)} must be >= {minimum}, got {value}")


def check_positive(args: argparse.Namespace, *dests: str) -> None:
    """Each option named (by ``dest``) that is set must be > 0 (learning rates)."""
    for dest in dests:
        value = getattr(args, dest, None)
        if value is not None and not value > 0:
            _fail(f"{_flag(dest)} must be > 0, got {value}")


def check_folder(args: argparse.Namespace, dest: str, what: str = "folder", positional: bool = False) -> None:
    """The option named (by ``dest``), when set, must be an existing folder (``what`` it should hold);
    ``positional``: a positional argument, named in the message by its value alone."""
    value = getattr(args, dest, None)
    if value is None:
        return
    path, name = Path(value), str(value) if positional else f"{_flag(dest)} {value}"
    if not path.exists():
        _fail(f"{name}: no such {what}")
    if not path.is_dir():
        _fail(f"{name}: a file, not a {what}")


def check_device(args: argparse.Namespace) -> None:
    """``--device``, when the command has one, must be a device this machine has (``torch.device("cuda")``
    succeeds without CUDA; the first tensor moved there fails deep inside the recipe)."""
    from ..devices import available_device

    if getattr(args, "device", None) is not None:
        try:
            available_device(str(args.device))
        except ValueError as err:
            _fail(f"--device {err}")


def check_file(args: argparse.Namespace, dest: str) -> None:
    """The option named (by ``dest``), when set, must be an existing file."""
    value = getattr(args, dest, None)
    if value is not None and not Path(value).is_file():
        _fail(f"{_flag(dest)} {value}: no such file")


def check_train_drafter_settings(args: argparse.Namespace, kinds: list[str]) -> None:
    """``mmspec train-drafter``: the target kind (one of ``kinds``), the target folder, the input files
    and every count."""
    if args.target_kind not in kinds:
        _fail(f"--target-kind must be one of {', '.join(kinds)}; got {args.target_kind!r}")
    if args.arch == "eagle3" and args.target_kind not in ("lm", "vlm"):
        _fail(f"--arch eagle3 trains heads for --target-kind lm or vlm, not {args.target_kind!r}")
    check_folder(args, "target_path", "model folder")
    check_file(args, "prompts")
    if getattr(args, "images", None) is not None and not Path(args.images).exists():
        _fail(f"--images {args.images}: no such folder or list file")
    check_at_least(
        args,
        {
            "steps": 1,
            "batch_size": 1,
            "seq_len": 1,
            "n_head": 1,
            "checkpoint_every": 0,
            "ratio": 1,
            "num_queries": 1,
            "tokens_per_step": 1,
            "num_images": 1,
            "answer_len": 1,
            "draft_vocab_size": 1,
            "ttt_steps": 1,
            "vocab_batches": 1,
        },
    )
    check_positive(args, "lr")
    check_device(args)
    if args.resume and args.checkpoint_dir is None:
        _fail("--resume continues from --checkpoint-dir: pass the folder the earlier run wrote its checkpoints to")


def _check_recipe_run(args: argparse.Namespace) -> None:
    """The run options of :func:`mmspec.training.loop.add_recipe_run_args` (0 checkpoints: only at the end)."""
    check_at_least(args, {"checkpoint_every": 0, "threads": 1})
    check_device(args)


def check_train_reference_settings(args: argparse.Namespace, stages: list[str]) -> None:
    """``mmspec train-reference``: the step override of every one of ``stages`` and the run options."""
    check_at_least(args, {f"{stage.replace('-', '_')}_steps": 1 for stage in stages})
    _check_recipe_run(args)


def check_train_video_settings(args: argparse.Namespace) -> None:
    """``mmspec train-video``: the counts, the learning rate and the ``--init-from`` folder."""
    check_at_least(args, {"steps": 1, "batch_size": 1, "sampler_steps": 1})
    check_positive(args, "lr")
    check_folder(args, "init_from", "folder of trained models")
    check_device(args)


def check_train_captioner_settings(args: argparse.Namespace) -> None:
    """``mmspec train-captioner``: the counts (``--draft-steps 0``: no draft model), the language model
    (``smollm2`` or a folder) and the run options."""
    check_at_least(
        args,
        {
            "vision_steps": 1,
            "steps": 1,
            "batch_size": 1,
            "heldout_samples": 1,
            "max_glyphs": 1,
            "draft_steps": 0,
            "tune_lm_layers": 0,
        },
    )
    if args.language_model not in (None, "smollm2"):
        check_folder(args, "language_model", "folder (a save_pretrained language model; or 'smollm2')")
    _check_recipe_run(args)
