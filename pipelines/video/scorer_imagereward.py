"""ImageReward (Xu et al. 2023, arXiv 2304.05977) as a frame scorer: an adapter over the
``image-reward`` package's model, or over any object with its interface
``score(prompt: str, images: list[PIL.Image]) -> list[float]`` (one reward per image; a plain float
for a single image, as ImageReward returns it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .scorer_base import FrameScorer, frames_to_pil, register_frame_scorer


@register_frame_scorer
class ImageRewardScorer(FrameScorer):
    """ImageReward's human-preference reward of each frame for its prompt.

    Args:
        model: the loaded ImageReward model (``ImageReward.load(path)``) or any object with its
            ``score(prompt, images)`` method.
        batch_size: frames per call of ``model.score`` (frames of one prompt go together).
    """

    name = "imagereward"
    measures = (
        "ImageReward's human-preference reward (standardised over its training set: mean 0, std 1; higher = preferred)"
    )

    def __init__(self, model: Any, batch_size: int = 64) -> None:
        super().__init__(batch_size)
        if not callable(getattr(model, "score", None)):
            raise ValueError(
                f"the 'imagereward' scorer needs a model with score(prompt, images), got {type(model).__name__}"
            )
        self.model = model  # an nn.Module (the real ImageReward) is registered and moves with .to()

    @classmethod
    def from_options(
        cls,
        weights: str | os.PathLike | None = None,
        model: Any = None,
        download_root: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
    ) -> ImageRewardScorer:
        """From a loaded ``model``, or from the ImageReward checkpoint file ``weights`` through
        ``ImageReward.load(weights, device, download_root)`` (the package reads its
        ``med_config.json`` from ``download_root``, downloading it when absent).

        Raises:
            ValueError: neither or both of ``weights`` and ``model``.
            FileNotFoundError: ``weights`` does not exist (the message names the path).
            ImportError: the ``image-reward`` package is not installed.
        """
        if (weights is None) == (model is None):
            raise ValueError("the 'imagereward' scorer needs exactly one of weights=PATH (ImageReward.pt) or model=")
        if weights is not None:
            if not Path(weights).is_file():
                raise FileNotFoundError(f"ImageReward weights not found: {os.fspath(weights)!r} is not a file")
            try:
                import ImageReward
            except ImportError as err:
                raise ImportError(
                    "the 'imagereward' frame scorer needs the image-reward package: pip install image-reward "
                    "(or pass model=, an object with its score(prompt, images) interface)"
                ) from err
            root = None if download_root is None else os.fspath(download_root)
            model = ImageReward.load(os.fspath(weights), device=device, download_root=root)
        return cls(model, batch_size=batch_size)

    def score_images(
        self,
        captions: list[str],
        images: torch.Tensor,  # [N, 3, H, W] float in [0, 1]
    ) -> torch.Tensor:
        """Rewards ``[N]``: one ``model.score`` call per run of frames sharing a caption."""
        pil = frames_to_pil(images)
        rewards: list[float] = []
        start = 0
        while start < len(captions):
            end = start
            while end < len(captions) and captions[end] == captions[start]:
                end += 1
            out = self.model.score(captions[start], pil[start:end])
            out = [out] if isinstance(out, (int, float)) else list(out)
            if len(out) != end - start:
                raise ValueError(f"the ImageReward model returned {len(out)} rewards for {end - start} images")
            rewards += [float(r) for r in out]
            start = end
        return torch.tensor(rewards, dtype=torch.float32)
