"""A cheap learned frame scorer: a small CNN classifier over the video model's classes, scoring
each frame by the log-probability it gives the prompt's class.

SDVG (arXiv 2604.17397) routes on a frame-quality model; on a CPU-sized video pair a VLM scorer
costs as much as the target forwards it could save. A classifier trained on real frames of the
classes (and on their VAE round-trips, so that the VAE's own blur is not held against a frame)
costs a few milliseconds per block on a CPU core and answers the question the router needs on a
class-conditional model: does this frame show the prompt's class? Prompts are class names, matched
as the pipeline matches them (case-insensitive, surrounding spaces ignored).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..component_mixin import ComponentMixin
from .scorer_base import FrameScorer, register_frame_scorer


class FrameClassifier(ComponentMixin, ModelMixin, ConfigMixin):
    """Frames ``[N, 3, S, S]`` in [0, 1] -> class logits ``[N, num_classes]``: three stride-2
    convolution stages (``channels``, ``2 channels``, ``2 channels``, GroupNorm + SiLU), global
    average pooling and a linear head.

    Args:
        image_size: frame side ``S`` in pixels (frames of another size are refused).
        num_classes: classes; ``class_names`` (one per class) are the prompts it scores.
        channels: width of the first stage (a multiple of 8, for GroupNorm).
        class_names: caption text of each class (the video model's ``class_names``).
    """

    @register_to_config
    def __init__(
        self, image_size: int = 32, num_classes: int = 16, channels: int = 32, class_names: list[str] | None = None
    ) -> None:
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names for {num_classes} classes")
        if channels % 8:
            raise ValueError(f"channels must be a multiple of 8, got {channels}")
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1),
            nn.GroupNorm(8, c),
            nn.SiLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1),
            nn.GroupNorm(8, 2 * c),
            nn.SiLU(),
            nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1),
            nn.GroupNorm(8, 2 * c),
            nn.SiLU(),
            nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1),
            nn.GroupNorm(8, 2 * c),
            nn.SiLU(),
        )
        self.head = nn.Linear(2 * c, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [N, 3, S, S] in [0, 1] -> [N, num_classes]
        size = self.config.image_size
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"the frame classifier takes frames [N, 3, {size}, {size}], got {tuple(images.shape)}")
        x = images.to(self.device, self.dtype).clamp(0, 1) * 2 - 1
        return self.head(self.features(x).mean(dim=(2, 3)))

    def class_index(self, caption: str) -> int:
        """The class ``caption`` names (case-insensitive, surrounding spaces ignored).

        Raises:
            ValueError: the classifier has no class names, or none matches (the message lists them).
        """
        names = self.config.class_names
        if not names:
            raise ValueError("this frame classifier has no class_names: it cannot map prompts to classes")
        lookup = {name.lower(): i for i, name in enumerate(names)}
        key = caption.strip().lower() if isinstance(caption, str) else None
        if key not in lookup:
            raise ValueError(f"prompt {caption!r} names no class of the frame classifier; its classes: {list(names)}")
        return lookup[key]


@register_frame_scorer
class ClassifierFrameScorer(FrameScorer):
    """Log-probability ``log p(class | frame)`` that a :class:`FrameClassifier` gives the class the
    prompt names.

    Args:
        classifier: the trained classifier (its ``class_names`` are the prompts it accepts).
        batch_size: frames per forward.
    """

    name = "classifier"
    measures = (
        "log-probability (nats, <= 0) that a small CNN trained on real frames of the model's classes gives "
        "the prompt's class; 0 = certain, log(1 / num_classes) = chance"
    )

    def __init__(self, classifier: FrameClassifier, batch_size: int = 64) -> None:
        super().__init__(batch_size)
        if not isinstance(classifier, FrameClassifier):
            raise ValueError(f"classifier must be a FrameClassifier, got {type(classifier).__name__}")
        self.classifier = classifier.eval()

    @classmethod
    def from_options(
        cls,
        path: str | os.PathLike | None = None,
        batch_size: int = 64,
        device: str | torch.device | None = None,
    ) -> ClassifierFrameScorer:
        """From a :class:`FrameClassifier` folder ``path`` (``save_pretrained`` format; the embedded
        one is ``mmspec.app.defaults.default_frame_classifier_path()``), in float32 on ``device``.

        Raises:
            ValueError: no ``path``.
            FileNotFoundError: ``path`` holds no classifier (the message names it).
        """
        if path is None:
            raise ValueError(
                "the 'classifier' scorer needs path= a FrameClassifier folder (the embedded one: "
                "mmspec.app.defaults.default_frame_classifier_path())"
            )
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(
                f"no frame classifier for the 'classifier' scorer in {os.fspath(path)!r} (config.json is missing)"
            )
        classifier = FrameClassifier.from_pretrained(path).to(device or "cpu", torch.float32)
        return cls(classifier, batch_size=batch_size)

    @property
    def class_names(self) -> list[str]:
        return list(self.classifier.config.class_names or [])

    def score_images(
        self,
        captions: list[str],
        images: torch.Tensor,  # [N, 3, H, W] float in [0, 1]
    ) -> torch.Tensor:
        """``log p(class named by captions[i] | images[i])`` ``[N]``."""
        classes = torch.tensor([self.classifier.class_index(c) for c in captions], device=self.device)
        logprobs = F.log_softmax(self.classifier(images).float(), dim=-1)  # [N, num_classes]
        return logprobs.gather(1, classes[:, None])[:, 0]
