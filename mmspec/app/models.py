"""Model selection shared by the command line and the demos: the ``--device`` / ``--dtype`` and
LlamaGen source arguments, and loading the pipeline (and its class names) they name; loading a video
pipeline, its frame scorer and its calibrated SDVG threshold. Both
:mod:`mmspec.app.cli` and :mod:`mmspec.app.demos` import it; it imports neither. torch is imported
inside the functions, so building the parser (``mmspec --help``) stays fast."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint_io import read_json

if TYPE_CHECKING:
    import torch


def add_device(p: argparse.ArgumentParser) -> None:
    """The ``--device`` argument that :func:`resolve_device` reads."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")


def resolve_device(name: str | None) -> torch.device:
    """``--device`` as a torch device; by default CUDA when available, else the CPU."""
    import torch

    from ..devices import available_device

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return available_device(name)
    except ValueError as err:
        raise SystemExit(f"error: --device {err}") from None


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """``--dtype`` as a torch dtype; by default bfloat16 on CUDA and float32 elsewhere."""
    import torch

    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise SystemExit(f"error: --dtype must be a torch dtype such as float32 or bfloat16, got {name!r}")
    return getattr(torch, name)


def add_model(p: argparse.ArgumentParser | argparse._ArgumentGroup, default_family: str = "llamagen") -> None:
    """The ``--model`` argument that :func:`mmspec.app.generators.resolve_model` reads."""
    p.add_argument(
        "--model",
        default=None,
        help=f"a model family (llamagen, mar, ...: its embedded model), an embedded model name, or a folder "
        f"written by save_pretrained (default: the embedded {default_family} model)",
    )


def add_llamagen_source(p: argparse.ArgumentParser | argparse._ArgumentGroup, model: bool = True) -> None:
    """The ``--model`` (unless ``model`` is False) / ``--official-gpt`` / ``--official-vq`` /
    ``--gpt-config`` / ``--vq-config`` arguments that :func:`load_llamagen` reads."""
    if isinstance(p, argparse.ArgumentParser):
        p = p.add_argument_group("LlamaGen model (default: the embedded reference model, offline)")
    if model:
        p.add_argument("--model", default=None, help="a LlamaGenPipeline folder written by save_pretrained")
    p.add_argument("--official-gpt", default=None, help="official LlamaGen GPT checkpoint (.pt)")
    p.add_argument("--official-vq", default=None, help="official LlamaGen VQ checkpoint (.pt)")
    p.add_argument("--gpt-config", default=None, help="preset name (e.g. GPT-XL) or a JSON file of ModelArgs")
    p.add_argument("--vq-config", default=None, help="preset name (e.g. VQ-16) or a JSON file of ModelArgs")


def _official_config(value: str | None, flag: str):
    if value is None:
        raise SystemExit(f"error: {flag} is required with official checkpoints (a preset name or a JSON file)")
    path = Path(value)
    return _read_record(path, flag) if path.suffix == ".json" else value


def _read_record(path: Path, flag: str | None = None):
    """The JSON in ``path`` (a config or record file given or found in a model folder); ``SystemExit``
    naming the file when it cannot be read (``flag``: the option that named it)."""
    try:
        return read_json(path)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {flag + ': ' if flag else ''}{err}") from None


def load_llamagen(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, path: Path | None = None):
    """The pipeline named by the command line: official checkpoints, a saved folder (``path``, else
    ``args.model``), or the embedded default."""
    import torch

    from ..pipelines.llamagen import LlamaGenPipeline

    if args.official_gpt or args.official_vq:
        if not (args.official_gpt and args.official_vq):
            raise SystemExit("error: pass both --official-gpt and --official-vq")
        pipe = LlamaGenPipeline.from_official(
            args.official_gpt,
            args.official_vq,
            _official_config(args.gpt_config, "--gpt-config"),
            _official_config(args.vq_config, "--vq-config"),
        )
    elif path is not None or args.model:
        folder = path if path is not None else args.model
        try:
            pipe = LlamaGenPipeline.from_pretrained(folder)
        except (OSError, ValueError) as err:  # not a pipeline folder, or weights that do not match
            raise SystemExit(f"error: --model {folder}: {err}") from None
    else:
        from .defaults import load_default_llamagen

        pipe = load_default_llamagen()
    pipe.to(device)
    if dtype != torch.float32:  # the VQ decoder stays in float32: it is cheap and fp32-sensitive
        for model in (pipe.target, pipe.drafter, pipe.low_res_drafter):
            if model is not None:
                model.to(dtype)
    return pipe


def llamagen_classes(args: argparse.Namespace) -> list[dict] | None:
    """The ``{"label", "char", "name"}`` entries of the classes file saved beside a reference
    pipeline (the embedded default's or ``--model``'s; see :data:`mmspec.training.saved.CLASSES_FILE`), or None
    (official checkpoints, or a folder without the file)."""
    from ..training.saved import CLASSES_FILE
    from .defaults import default_llamagen_path

    if args.official_gpt:
        return None
    path = Path(args.model or default_llamagen_path()) / CLASSES_FILE
    if not path.is_file():
        return None
    return _read_record(path)


#: The embedded video pair (a folder under ``mmspec/assets``).
VIDEO_EMBEDDED = "video-emoji"
#: The calibrated router settings a video model folder may carry (scorer, aggregate, tau, how chosen).
SDVG_FILE = "sdvg.json"


def load_video(path: Path | None, device, dtype=None) -> Any:
    """The video pipeline in ``path`` (None: the embedded pair)."""
    import torch

    from ..pipelines.video import VideoPipeline
    from .generators import assets_dir

    folder = path or assets_dir() / VIDEO_EMBEDDED
    if not (folder / "model_index.json").is_file():
        raise SystemExit(f"error: no video pipeline in {folder} (model_index.json is missing)")
    try:
        pipe = VideoPipeline.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: --model {folder}: {err}") from None
    return pipe.to(device, dtype or torch.float32)


@dataclass(frozen=True)
class VideoDefaults:
    """A video model folder's SDVG settings when the user gives none: the frame ``scorer`` its τ was
    calibrated for, the target's ``num_inference_steps``, the drafter's ``draft_steps`` (None: the
    target's) and the ``guidance_scale`` of the calibration (the bench and the demo use it; the CLI's
    ``--guidance-scale`` has its own default, shared by every family). From the folder's
    ``sdvg.json``; a folder without one gets the fields' defaults."""

    scorer: str = "vlm"
    num_inference_steps: int = 4
    draft_steps: int | None = None
    guidance_scale: float = 1.0

    @classmethod
    def of(cls, folder: Path) -> VideoDefaults:
        file = folder / SDVG_FILE
        if not file.is_file():
            return cls()
        record = _read_record(file)
        return cls(
            scorer=record.get("scorer", cls.scorer),
            num_inference_steps=int(record.get("num_inference_steps", cls.num_inference_steps)),
            draft_steps=record.get("draft_steps"),
            guidance_scale=float(record.get("guidance_scale", cls.guidance_scale)),
        )


def build_scorer(name: str, options: dict, device, folder: Path | None = None) -> Any:
    """The frame scorer ``name`` (``vlm`` without a path: the embedded captioner; ``classifier``
    without a path: the video model ``folder``'s ``classifier/`` if it has one, else the embedded
    video pair's frame classifier)."""
    from ..pipelines.video.scorers import FRAME_SCORERS, get_frame_scorer

    if name not in FRAME_SCORERS:
        raise SystemExit(f"error: --scorer {name}: unknown; available: {', '.join(sorted(FRAME_SCORERS))}")
    options = dict(options)
    if name == "vlm" and "path" not in options and "pipeline" not in options:
        from .defaults import default_captioner_path

        options["path"] = str(default_captioner_path())
    if name == "classifier" and "path" not in options:
        from .defaults import default_frame_classifier_path

        own = None if folder is None else Path(folder) / "classifier"
        options["path"] = str(own if own is not None and own.is_dir() else default_frame_classifier_path())
    try:
        return get_frame_scorer(name, **options).to(device)
    except (ValueError, FileNotFoundError, OSError, ImportError) as err:
        raise SystemExit(f"error: --scorer {name}: {err}") from None


def calibrated_tau(folder: Path, scorer: str, aggregate: str) -> float | None:
    """τ from the model folder's ``sdvg.json`` when it was calibrated for this scorer and aggregate."""
    file = folder / SDVG_FILE
    if not file.is_file():
        return None
    record = _read_record(file)
    if record.get("scorer") != scorer or record.get("aggregate", "min") != aggregate:
        return None
    return float(record["tau"])
