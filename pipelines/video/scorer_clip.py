"""CLIP score of frames through ``open_clip`` (the ``clip`` extra), with weights from a user path.

CLIPScore (Hessel et al. 2021, arXiv 2104.08718) rates an image against a caption by the cosine
similarity of CLIP's image and text embeddings (``w * max(cos, 0)`` with w = 2.5 there; 100 * cos in
torchmetrics). Here: ``100 * cos`` without the clamp at 0, so that a router can still rank poor frames.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .scorer_base import FrameScorer, register_frame_scorer

#: OpenAI CLIP's normalisation, for a model whose config names none.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


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
        model: an ``open_clip`` CLIP model (``encode_image``, ``encode_text``, ``visual.image_size``).
        tokenizer: its tokenizer (``open_clip.get_tokenizer(model_name)``).
        batch_size: frames per forward.

    Frames are preprocessed in torch as open_clip's default eval transform does (shorter side
    resized to the model's input size with bicubic anti-aliased interpolation, centre crop, the
    model's mean / std), without a round trip through PIL.
    """

    name = "clip"
    measures = "100 x cosine similarity of CLIP's image and text embeddings (-100..100; higher = better match)"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, batch_size: int = 64) -> None:
        super().__init__(batch_size)
        self.model = model.eval()
        self.tokenizer = tokenizer
        visual = model.visual
        size = visual.image_size
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        mean = getattr(visual, "image_mean", None) or OPENAI_MEAN
        std = getattr(visual, "image_std", None) or OPENAI_STD
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_options(
        cls,
        weights: str | os.PathLike | None = None,
        model_name: str = "ViT-B-32",
        batch_size: int = 64,
        device: str | torch.device | None = None,
    ) -> CLIPFrameScorer:
        """Build ``open_clip``'s ``model_name`` architecture and load ``weights`` (a checkpoint
        file open_clip reads: a state dict, or a dict with ``state_dict``) on ``device``.

        Raises:
            ValueError: no ``weights`` given.
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
        model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=str(path), device=device)
        return cls(model, open_clip.get_tokenizer(model_name), batch_size=batch_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:  # [N, 3, H, W] in [0, 1] -> [N, 3, h, w]
        """Resize the shorter side to the model's input, centre-crop, normalise."""
        h, w = images.shape[-2:]
        th, tw = self.image_size
        scale = max(th / h, tw / w)
        size = (max(th, round(h * scale)), max(tw, round(w * scale)))
        x = F.interpolate(images.float().clamp(0, 1), size=size, mode="bicubic", antialias=True, align_corners=False)
        top, left = (size[0] - th) // 2, (size[1] - tw) // 2
        x = x[:, :, top : top + th, left : left + tw].clamp(0, 1)
        return (x - self.mean) / self.std

    def score_images(
        self,
        captions: list[str],
        images: torch.Tensor,  # [N, 3, H, W] float in [0, 1]
    ) -> torch.Tensor:
        """``100 * cos`` ``[N]`` of each frame's and its caption's embeddings (texts encoded once each)."""
        device = self.mean.device
        unique = list(dict.fromkeys(captions))
        text = F.normalize(self.model.encode_text(self.tokenizer(unique).to(device)).float(), dim=-1)  # [U, D]
        image = F.normalize(self.model.encode_image(self.preprocess(images.to(device))).float(), dim=-1)  # [N, D]
        rows = torch.tensor([unique.index(c) for c in captions], device=device)
        return 100.0 * (image * text[rows]).sum(-1)
