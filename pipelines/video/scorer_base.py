"""The frame-scorer contract and its registry (:mod:`.scorers` imports every scorer and builds
them by name).

A frame scorer rates each frame of a batch of videos against the row's prompt:
``score(prompts, frames [B, F, 3, H, W]) -> [B, F]``, higher = better. SDVG's router (arXiv
2604.17397; ``"score-threshold"`` in :mod:`mmspec.routers`) keeps a drafted block when the
aggregate (worst frame by default) of its frames' scores clears a threshold τ.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch
from torch import nn

#: name -> scorer class; filled by :func:`register_frame_scorer`.
FRAME_SCORERS: dict[str, type[FrameScorer]] = {}


def register_frame_scorer(cls: type[FrameScorer]) -> type[FrameScorer]:
    """Class decorator: make a scorer available by its ``name`` (``get_frame_scorer(name, ...)``)."""
    FRAME_SCORERS[cls.name] = cls
    return cls


class FrameScorer(nn.Module, ABC):
    """Scores every frame of a batch of videos against its row's prompt (higher = better).

    An ``nn.Module`` so that a pipeline can register it as a component (its models move with
    ``.to()``). Subclasses implement :meth:`score_images` on a flat batch of frames; :meth:`score`
    checks the inputs, flattens ``[B, F]`` and runs at most ``batch_size`` frames per forward.

    Class attributes: ``name`` (registry key) and ``measures`` (what the score is, in words: units,
    range, what a higher value means), which the docs and CLI show.
    """

    name: ClassVar[str]
    measures: ClassVar[str]

    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.batch_size = batch_size

    @classmethod
    def from_options(cls, **options: Any) -> FrameScorer:
        """Build from the options :func:`~.scorers.get_frame_scorer` passes (default: the constructor's)."""
        return cls(**options)

    @classmethod
    def option_names(cls) -> list[str]:
        """The options :meth:`from_options` takes (for error messages and docs)."""
        target = cls.__init__ if cls.from_options.__func__ is FrameScorer.from_options.__func__ else cls.from_options
        return [n for n, p in inspect.signature(target).parameters.items() if n not in ("self", "cls", "options")]

    @property
    def device(self) -> torch.device:
        """Where the scorer's model runs (CPU when it has no tensors of its own)."""
        tensor = next(self.parameters(), None)
        return torch.device("cpu") if tensor is None else tensor.device

    @torch.no_grad()
    def score(
        self,
        prompts: list[str],
        frames: torch.Tensor,  # [B, F, 3, H, W] float in [0, 1]
    ) -> torch.Tensor:
        """Per-frame scores ``[B, F]`` (float32, on ``frames.device``) of each row's frames against
        ``prompts[b]``.

        Raises:
            ValueError: ``frames`` is not ``[B, F, 3, H, W]`` floats, or ``prompts`` is not a list of
                ``B`` strings.
        """
        check_frames(frames, prompts)
        b, f = frames.shape[:2]
        images = frames.reshape(b * f, *frames.shape[2:])  # [B*F, 3, H, W]
        captions = [prompt for prompt in prompts for _ in range(f)]
        out = [
            self.score_images(captions[i : i + self.batch_size], images[i : i + self.batch_size]).float()
            for i in range(0, b * f, self.batch_size)
        ]
        return torch.cat(out).to(frames.device).reshape(b, f)

    def forward(self, prompts: list[str], frames: torch.Tensor) -> torch.Tensor:  # [B, F, 3, H, W] -> [B, F]
        """Same as :meth:`score`."""
        return self.score(prompts, frames)

    @abstractmethod
    def score_images(
        self,
        captions: list[str],
        images: torch.Tensor,  # [N, 3, H, W] float in [0, 1]
    ) -> torch.Tensor:
        """Scores ``[N]`` of ``images[i]`` against ``captions[i]`` (``N <= batch_size``)."""


def check_frames(frames: Any, prompts: Any) -> None:
    """``ValueError`` unless ``frames`` is a float tensor ``[B, F, 3, H, W]`` and ``prompts`` a list
    of ``B`` strings (values outside [0, 1] are the caller's business: decoders overshoot a little,
    and scorers clamp)."""
    if not isinstance(frames, torch.Tensor) or frames.dim() != 5 or frames.shape[2] != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"frames must be a tensor [B, F, 3, H, W] (RGB in [0, 1]), got {shape}")
    if not frames.is_floating_point():
        raise ValueError(f"frames must be floats in [0, 1], got dtype {frames.dtype}")
    if frames.shape[0] == 0 or frames.shape[1] == 0:
        raise ValueError(f"frames must hold at least one video of one frame, got shape {tuple(frames.shape)}")
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if len(prompts) != frames.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {frames.shape[0]} videos: give one prompt per video")


def frames_to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:  # [N, 3, H, W] in [0, 1]
    """RGB PIL images of frames (clamped to [0, 1], rounded to 8 bits)."""
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [PIL.Image.fromarray(np.ascontiguousarray(a)) for a in array]
