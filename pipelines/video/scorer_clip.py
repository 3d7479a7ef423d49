"""CLIP score of frames through ``open_clip`` (the ``clip`` extra), with weights from a user path.

CLIPScore (Hessel et al. 2021, arXiv 2104.08718) rates an image against a caption by the cosine
similarity of CLIP's image and text embeddings (``w * max(cos, 0)`` with w = 2.5 there, ``100 * max(cos, 0)``
in torchmetrics). Here: ``100 * cos`` without the clamp at 0, so that a router can still rank poor frames.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .scorer_base import FrameScorer, register_frame_scorer


def import_open_clip() -> Any:
    """``open_clip``, or an ImportError saying how to install it."""
    try:
        import open_clip
    except ImportError as err:
        raise ImportError(
            "the 'clip' frame scorer needs open_clip: pip install 'mmspec[clip]' (open-clip-torch and torchvision)"
        ) from err
    return open_clip


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
        """Build ``open_clip``'s ``model_name`` architecture (one of ``open_clip.list_models()``)
        and load ``weights`` (a checkpoint file open_clip reads: a state dict, or a dict with
        ``state_dict``) on ``device``.

        Raises:
            ValueError: no ``weights`` given, an unknown ``model_name``, or weights of another
                architecture.
            FileNotFoundError: ``weights`` does not exist (the message names the path).
            ImportError: open_clip is not installed.
        """
        if weights is None:
            raise ValueError(
                "the 'clip' scorer needs weights=PATH (a CLIP checkpoint file for open_clip's "
                f"{model_name!r}); no weights ship with mmspec"
            )
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"CLIP weights not found: {os.fspath(weights)!r} is not a file")
        open_clip = import_open_clip()
        if model_name not in open_clip.list_models():
            raise ValueError(f"open_clip has no model {model_name!r}; see open_clip.list_models()")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=str(path), device=device
            )
        except (RuntimeError, KeyError, AssertionError) as err:  # open_clip asserts on mis-shaped weights
            raise ValueError(f"{os.fspath(path)!r} does not hold weights of open_clip's {model_name!r}: {err}") from err
        return cls(model, open_clip.get_tokenizer(model_name), preprocess, batch_size=batch_size)

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
