"""A learned token up-sampler for MuLo-SD (Peruzzo, Sautière & Habibian 2026, arXiv 2601.05149):
the paper's ``U_r``, which maps the low-resolution drafter's token grid to candidate tokens on the
target's grid (``r`` times the side) in the same VQ codebook.

The paper trains its up-samplers; their architecture could not be read for this build, so this one
is this implementation's: a small convolutional network over token embeddings. It is trained by
:func:`mmspec.training.reference_upsampler.train_upsampler` on pairs of grids of the SAME scene tokenised at
both resolutions (cross-entropy of the high-resolution tokens), so for each target position it
predicts the codebook entry most likely there given the low-resolution grid: a sharper candidate
than the training-free decode -> resize -> re-encode, which encodes a blurred image.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..component_mixin import ComponentMixin
from .modeling_vq import ResnetBlock


class LlamaGenTokenUpsampler(ComponentMixin, ModelMixin, ConfigMixin):
    """Token grid ``[B, h, w]`` -> logits over the codebook on the ``scale``-times grid.

    Layers: token embedding -> ``num_blocks`` residual conv blocks at the low resolution -> 1x1 conv
    to ``dim * scale²`` channels + pixel shuffle (each low position writes its ``scale x scale``
    patch) -> ``num_blocks`` residual blocks at the high resolution -> GroupNorm, SiLU, 1x1 conv to
    ``vocab_size`` logits.

    Args:
        vocab_size: the VQ codebook size (draft and target grids index it).
        scale: the side ratio ``r`` between the target's grid and the drafter's (>= 1).
        dim: channel width (a multiple of 32: the residual blocks use 32-group GroupNorm).
        num_blocks: residual blocks at each of the two resolutions.
    """

    @register_to_config
    def __init__(self, vocab_size: int, scale: int = 2, dim: int = 96, num_blocks: int = 1) -> None:
        super().__init__()
        if scale < 1:
            raise ValueError(f"scale must be >= 1 (the target grid's side over the drafter's), got {scale}")
        if dim % 32:
            raise ValueError(f"dim must be a multiple of 32 (32-group GroupNorm), got {dim}")
        self.embed = nn.Embedding(vocab_size, dim)
        self.low_blocks = nn.Sequential(*(ResnetBlock(dim, dim) for _ in range(num_blocks)))
        self.expand = nn.Conv2d(dim, dim * scale * scale, kernel_size=1)
        self.shuffle = nn.PixelShuffle(scale)
        self.high_blocks = nn.Sequential(*(ResnetBlock(dim, dim) for _ in range(num_blocks)))
        self.norm_out = nn.GroupNorm(32, dim, eps=1e-6)
        self.head = nn.Conv2d(dim, vocab_size, kernel_size=1)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``[B, h, w]`` (long) -> logits ``[B, V, h * scale, w * scale]``."""
        x = self.embed(tokens).permute(0, 3, 1, 2)  # [B, dim, h, w]
        x = self.shuffle(self.expand(self.low_blocks(x)))  # [B, dim, h * s, w * s]
        x = self.high_blocks(x)
        return self.head(nn.functional.silu(self.norm_out(x)))

    @torch.no_grad()
    def upsample(self, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """MuLo-SD's up-sampler interface (:class:`~mmspec.pipelines.llamagen.mulo.TokenUpsampler`):
        ``tokens [B, h, w]`` -> the most likely token at each position of the ``size`` grid
        ``[B, H, W]``, which must be ``scale`` times the input's side."""
        scale = self.config.scale
        expected = (tokens.shape[1] * scale, tokens.shape[2] * scale)
        if tuple(size) != expected:
            raise ValueError(
                f"this up-sampler maps a {tokens.shape[1]}x{tokens.shape[2]} grid to {expected[0]}x"
                f"{expected[1]} (scale {scale}), not to {size[0]}x{size[1]}: train one for this ratio "
                "(`mmspec train-reference --stage upsampler`) or use upsampler='decode-resize-encode'"
            )
        if int(tokens.max()) >= self.vocab_size or int(tokens.min()) < 0:  # deliberate host sync: once per image batch
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}): the up-sampler was trained for another codebook"
            )
        device = self.embed.weight.device
        # under sequential CPU offload the weights sit on "meta" and accelerate's hook moves inputs
        tokens = tokens if device.type == "meta" else tokens.to(device)
        return self(tokens).argmax(1)  # [B, H, W]
