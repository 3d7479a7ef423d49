"""A small frame VAE: every video frame is encoded on its own to a ``[C, H / 4, W / 4]`` latent
(a KL-regularised convolutional autoencoder, Kingma & Welling 2014 / the latent-diffusion VAE,
arXiv 2112.10752, at toy size). Draft and target video models share it: they generate in its
latent space, and the pipeline decodes once for the scorer and the output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..component_mixin import ComponentMixin


class _ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(8, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))


class FrameAutoencoderKL(ComponentMixin, ModelMixin, ConfigMixin):
    """Frames ``[N, 3, H, W]`` in [-1, 1] <-> latents ``[N, latent_channels, H / 4, W / 4]``.

    Args:
        image_size: frame side in pixels (a multiple of 4).
        latent_channels: channels of a latent pixel.
        channels: width of the convolutional trunk (a multiple of 8, for GroupNorm).
        scaling_factor: latents are ``mean * scaling_factor`` (set after training so that the
            video models see latents of about unit variance, as Stable Diffusion's VAE does).
    """

    @register_to_config
    def __init__(
        self, image_size: int = 32, latent_channels: int = 4, channels: int = 32, scaling_factor: float = 1.0
    ) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        c = channels
        self.encoder = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1),
            _ResBlock(c),
            nn.Conv2d(c, c, 4, stride=2, padding=1),
            _ResBlock(c),
            nn.Conv2d(c, c, 4, stride=2, padding=1),
            _ResBlock(c),
            nn.GroupNorm(8, c),
            nn.SiLU(),
            nn.Conv2d(c, 2 * latent_channels, 3, padding=1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, c, 3, padding=1),
            _ResBlock(c),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(c, c, 3, padding=1),
            _ResBlock(c),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(c, c, 3, padding=1),
            _ResBlock(c),
            nn.GroupNorm(8, c),
            nn.SiLU(),
            nn.Conv2d(c, 3, 3, padding=1),
        )

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of one frame's latent."""
        side = self.config.image_size // 4
        return (self.config.latent_channels, side, side)

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, logvar)`` ``[N, C, h, w]`` each, unscaled (training)."""
        mean, logvar = self.encoder(images.to(self.dtype)).chunk(2, dim=1)
        return mean, logvar.clamp(-20.0, 10.0)

    def encode(self, images: torch.Tensor) -> torch.Tensor:  # [N, 3, H, W] in [-1, 1] -> [N, C, h, w]
        """Scaled latents (the posterior mean, deterministic)."""
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-1] != self.config.image_size:
            raise ValueError(
                f"frames must be [N, 3, {self.config.image_size}, {self.config.image_size}], got {tuple(images.shape)}"
            )
        return self.encode_moments(images)[0] * self.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:  # [N, C, h, w] -> [N, 3, H, W] in about [-1, 1]
        """Frames from scaled latents."""
        if tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"latents must be [N, {', '.join(map(str, self.latent_shape))}], got {tuple(latents.shape)}"
            )
        return self.decoder(latents.to(self.dtype) / self.config.scaling_factor)

    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:  # [B, F, C, h, w] -> [B, F, 3, H, W] in [0, 1]
        """Every frame decoded, in [0, 1] (what scorers and outputs take)."""
        b, f = latents.shape[:2]
        frames = self.decode(latents.reshape(b * f, *latents.shape[2:]))
        return ((frames.float() + 1) / 2).clamp(0, 1).reshape(b, f, *frames.shape[1:])
