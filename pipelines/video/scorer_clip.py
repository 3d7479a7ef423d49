"""CLIP score of frames through ``open_clip`` (the ``clip`` extra), with weights from a user path.

CLIPScore (Hessel et al. 2021, arXiv 2104.08718) rates an image against a caption by the cosine
similarity of CLIP's image and text embeddings (``w * max(cos, 0)`` with w = 2.5 there, ``100 * max(cos, 0)``
in torchmetrics). Here: ``100 * cos`` without the clamp at 0, so that a router can still rank poor frames.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .scorer_base import FrameScorer, register_frame_scorer


@dataclass
class OpenCLIP:
    """An open_clip model loaded by :func:`load_open_clip`: ``model`` (eval mode), ``preprocess``
    (its evaluation transform), ``tokenizer`` and ``name`` (the architecture's name)."""

    model: torch.nn.Module
    preprocess: Any
    tokenizer: Any
    name: str


def load_open_clip(
    model_name: str, weights: str | os.PathLike | None, device: str | torch.device | None = None
) -> OpenCLIP:
    """Build open_clip's ``model_name`` (one of ``open_clip.list_models()``, or the path of an
    open_clip model-config ``.json`` file for an architecture open_clip does not list; the model is
    then named after the file's stem) and load ``weights`` (a checkpoint file open_clip reads: a
    state dict, or a dict with ``state_dict``) on ``device``. What the CLIP frame scorer and
    ``mmspec eval``'s CLIP score and CLIP features load.

    Raises:
        ValueError: no ``weights``, an unknown ``model_name``, or weights of another architecture.
        FileNotFoundError: ``weights`` or the config file does not exist (the message names the path).
        ImportError: open_clip is not installed (the message gives the install command).
    """
    if weights is None:
        raise ValueError(
            f"CLIP needs weights=PATH (an open_clip checkpoint file for {model_name!r}); no weights ship with mmspec"
        )
    if not Path(weights).is_file():
        raise FileNotFoundError(f"CLIP weights not found: {os.fspath(weights)!r} is not a file")
    try:
        import open_clip
    except ImportError as err:
        raise ImportError('CLIP needs open_clip: pip install "mmspec[clip]" (open-clip-torch and torchvision)') from err
    if model_name.endswith(".json"):
        if not Path(model_name).is_file():
            raise FileNotFoundError(f"open_clip model config not found: {model_name!r} is not a file")
        open_clip.add_model_config(model_name)
        model_name = Path(model_name).stem
    if model_name not in open_clip.list_models():
        raise ValueError(f"open_clip has no model {model_name!r}; see open_clip.list_models() or pass a config .json")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(weights), device=device)
    except (RuntimeError, KeyError, AssertionError) as err:  # open_clip asserts on mis-shaped weights
        raise ValueError(f"{os.fspath(weights)!r} does not hold weights of open_clip's {model_name!r}: {err}") from err
    return OpenCLIP(model.eval(), preprocess, open_clip.get_tokenizer(model_name), model_name)


@register_frame_scorer
class CLIPFrameScorer(FrameScorer):
    """CLIP score: ``100 * cos(image embedding, text embedding)`` per frame.

    Args:
        model: an ``open_clip`` CLIP model (``encode_image``, ``encode_text``).
        tokenizer: its tokenizer (``open_clip.get_tokenizer(model_name)``).
        preprocess: its evaluation transform (the third result of
            ``open_clip.create_model_and_transforms``), applied to the frame tensors as they are
            (torchvision's transforms take float tensors: resize, centre crop, normalise).
        batch_size: frames per forward.
    """

    name = "clip"
    measures = "100 x cosine similarity of CLIP's image and text embeddings (-100..100; higher = better match)"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, preprocess: Any, batch_size: int = 64) -> None:
        super().__init__(batch_size)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.preprocess = preprocess

    @classmethod
    def from_options(
        cls,
        weights: str | os.PathLike | None = None,
        model_name: str = "ViT-B-32",
        batch_size: int = 64,
        device: str | torch.device | None = None,
    ) -> CLIPFrameScorer:
        """Load open_clip's ``model_name`` (a listed architecture or a model-config ``.json``) with
        ``weights`` on ``device`` (:func:`load_open_clip`, which lists the errors)."""
        clip = load_open_clip(model_name, weights, device)
        return cls(clip.model, clip.tokenizer, clip.preprocess, batch_size=batch_size)

    def score_images(
        self,
        captions: list[str],
        images: torch.Tensor,  # [N, 3, H, W] float in [0, 1]
    ) -> torch.Tensor:
        """``100 * cos`` ``[N]`` of each frame's and its caption's embeddings (texts encoded once each)."""
        device = self.device
        unique = list(dict.fromkeys(captions))
        text = F.normalize(self.model.encode_text(self.tokenizer(unique).to(device)).float(), dim=-1)  # [U, D]
        image = F.normalize(
            self.model.encode_image(self.preprocess(images.to(device).clamp(0, 1))).float(), dim=-1
        )  # [N, D]
        rows = torch.tensor([unique.index(c) for c in captions], device=device)
        return 100.0 * (image * text[rows]).sum(-1)
