"""The embedded default models: small reference models shipped inside the package so that mmspec
runs offline on a fresh machine (``mmspec/assets/``; see the model card there)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..training.saved import (
    CAPTIONER_DRAFTER_SUBFOLDER,
    CLASSES_FILE,
    load_captioner_pipeline,
)

if TYPE_CHECKING:  # the pipeline imports diffusers; only load it when a model is requested
    from ..pipelines.llamagen.pipeline_llamagen import LlamaGenPipeline

_ASSETS = Path(__file__).resolve().parent.parent / "assets"
_REBUILD_HINT = (
    "Reinstall mmspec (the wheel ships the weights), or rebuild them with "
    "`mmspec train-reference --stage all --out DIR` and copy DIR/pipeline to {path}."
)


def default_llamagen_path() -> Path:
    """Folder of the embedded class-conditional LlamaGen reference pipeline (target GPT, VQ
    tokenizer and draft GPT trained on emoji; ``LlamaGenPipeline.save_pretrained`` format)."""
    return _ASSETS / "llamagen-emoji"


def _checked_path() -> Path:
    path = default_llamagen_path()
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the embedded LlamaGen reference model is missing ({path}). " + _REBUILD_HINT.format(path=path)
        )
    return path


def load_default_llamagen(device: str | torch.device = "cpu") -> LlamaGenPipeline:
    """Load the embedded LlamaGen reference pipeline (float32) on ``device``, with its EAGLE head
    (the ``eagle`` component, ``speculative="eagle"``).

    Raises:
        FileNotFoundError: the assets are not installed (the message says how to rebuild them).
    """
    from ..pipelines.llamagen.pipeline_llamagen import LlamaGenPipeline

    path = _checked_path()
    # The weights are stored in float32, so no dtype argument (its name differs across diffusers).
    return LlamaGenPipeline.from_pretrained(path).to(device)


def default_llamagen_classes() -> list[dict[str, object]]:
    """The embedded model's classes, in label order: ``{"label", "char", "name"}`` dicts
    (e.g. ``{"label": 0, "char": "😀", "name": "grinning face"}``).

    Raises:
        FileNotFoundError: the assets are not installed.
    """
    return json.loads((_checked_path() / CLASSES_FILE).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------- captioner
if TYPE_CHECKING:  # transformers' VLM classes load only when a captioner is requested
    from ..pipelines.vlm import VLMPipeline

_CAPTIONER_REBUILD_HINT = (
    "Reinstall mmspec (the wheel ships the weights), or rebuild them with "
    "`mmspec train-captioner --out DIR` and copy DIR/captioner to {path}."
)


def default_captioner_path() -> Path:
    """Folder of the embedded emoji captioner: a LLaVA model (HF ``save_pretrained`` format, with
    its processor) trained on emoji, and its draft model in ``drafter/``."""
    return _ASSETS / "captioner-emoji"


def default_frame_classifier_path() -> Path:
    """Folder of the embedded video pair's frame classifier (the ``"classifier"`` frame scorer's
    :class:`~mmspec.pipelines.video.scorer_classifier.FrameClassifier`, ``save_pretrained`` format)."""
    return _ASSETS / "video-emoji" / "classifier"


def load_default_captioner(device: str | torch.device = "cpu") -> VLMPipeline:
    """Load the embedded emoji captioner (with its drafter) in float32 on ``device``.

    Raises:
        FileNotFoundError: the assets are not installed (the message says how to rebuild them).
    """
    path = default_captioner_path()
    if not (path / "config.json").is_file() or not (path / CAPTIONER_DRAFTER_SUBFOLDER / "config.json").is_file():
        raise FileNotFoundError(
            f"the embedded captioner is missing ({path}). " + _CAPTIONER_REBUILD_HINT.format(path=path)
        )
    return load_captioner_pipeline(path, device)


# ---------------------------------------------------------------------------------------- MAR
if TYPE_CHECKING:
    from ..pipelines.mar import MARPipeline

_MAR_REBUILD_HINT = (
    "Reinstall mmspec (the wheel ships the weights), or rebuild them with "
    "`mmspec train-reference --stage mar --out DIR --save-dtype float16` and copy DIR/mar-pipeline to {path}."
)


def default_mar_path() -> Path:
    """Folder of the embedded MAR reference pair (``MARPipeline.save_pretrained`` format: a small
    KL VAE, a MAR target and a smaller MAR drafter trained on emoji; float16 weights)."""
    return _ASSETS / "mar-emoji"


def load_default_mar(device: str | torch.device = "cpu") -> MARPipeline:
    """Load the embedded MAR reference pair (float32; ``speculative="cspd"`` ready) on ``device``.

    Raises:
        FileNotFoundError: the assets are not installed (the message says how to rebuild them).
    """

    path = default_mar_path()
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the embedded MAR reference pair is missing ({path}). " + _MAR_REBUILD_HINT.format(path=path)
        )
    return load_mar_folder(path, device)


def load_mar_folder(path: str | Path, device: str | torch.device = "cpu") -> MARPipeline:
    """A saved :class:`MARPipeline` folder in float32 on ``device`` (float16-stored weights are
    widened: the CPU has no fast float16 path and CSpD's densities want float32)."""
    from ..pipelines.mar import MARPipeline

    pipe = MARPipeline.from_pretrained(path)
    for model in (pipe.target, pipe.vae, pipe.drafter):
        if model is not None:
            torch.nn.Module.to(model, torch.float32)
    return pipe.to(device)


def default_mar_classes() -> list[dict[str, object]]:
    """The embedded MAR pair's classes in label order (the LlamaGen reference's classes)."""
    return json.loads((default_mar_path() / CLASSES_FILE).read_text(encoding="utf-8"))
