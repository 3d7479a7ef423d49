"""MAR's KL-16 VAE (official ``models/vae.py::AutoencoderKL``, adopted from LDM's KL autoencoder,
Rombach et al. 2022) as a diffusers component, with the official parameter names.

The official class hard-codes the channel width ``ch = 128``; here every width is a config field
(:func:`mmspec.pipelines.mar.official.infer_vae_config` reads them from a state dict), so that
checkpoints of other widths load. diffusers' ``AutoencoderKL`` is not used: its module names
differ (``down_blocks``/``resnets``/``attentions`` with linear q/k/v) and its decoder runs
``num_res_blocks + 1`` blocks in the opposite storage order, so it cannot load the official keys
without a conversion table; this module loads them as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..component_mixin import ComponentMixin

#: The official KL-16's latent scale (``engine_mar.py``: tokens = vae latents * 0.2325); the
#: default ``scaling_factor`` of :class:`MARAutoencoderKL`.
TOKEN_SCALE = 0.2325


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q = self.q(h).reshape(b, c, hh * ww).permute(0, 2, 1)  # [B, HW, C]
        k = self.k(h).reshape(b, c, hh * ww)  # [B, C, HW]
        w = torch.softmax(torch.bmm(q, k) * (int(c) ** (-0.5)), dim=2)  # [B, HW(q), HW(k)]
        v = self.v(h).reshape(b, c, hh * ww)
        out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), ``attn`` (AttnBlocks, maybe empty) and a
    ``downsample`` / ``upsample``."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def run(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


def _attn_levels(num_levels: int, resolution: int, attn_resolutions: tuple[int, ...]) -> list[bool]:
    """Which levels carry attention: the running resolution (``resolution`` halved per level, as
    the official constructor counts it; independent of the input size) is in ``attn_resolutions``."""
    return [resolution // 2**i in attn_resolutions for i in range(num_levels)]


class Encoder(nn.Module):
    def __init__(
        self,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        attn: list[bool],
        z_channels: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            block_in, block_out = ch * in_mult[level], ch * mult
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            down = _Level(blocks, [AttnBlock(block_in) for _ in range(num_res_blocks)] if attn[level] else [])
            if level != len(ch_mult) - 1:
                down.downsample = Downsample(block_in)
            self.down.append(down)
        self.mid = _Mid(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            h = down.run(h)
            if level != len(self.down) - 1:
                h = down.downsample(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(
        self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int, out_ch: int = 3
    ) -> None:
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in)
        levels: list[_Level] = []
        for level in reversed(range(len(ch_mult))):  # built from the top level down, stored in level order
            block_out = ch * ch_mult[level]
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            up = _Level(blocks, [])
            if level != 0:
                up.upsample = Upsample(block_in)
            levels.insert(0, up)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(range(len(self.up))):
            h = self.up[level].run(h)
            if level != 0:
                h = self.up[level].upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class MARAutoencoderKL(ComponentMixin, ModelMixin, ConfigMixin):
    """KL autoencoder of MAR: ``encode(images [B, 3, H, W] in [-1, 1]) -> (mean, logvar)`` of the
    posterior ``[B, embed_dim, H/2^(levels-1), ...]``; ``decode(latents) -> images``. MAR's tokens
    are ``latents * scaling_factor`` (0.2325 for the official KL-16, MAR's ``engine_mar.py``; a VAE
    trained here records its own, diffusers' name for it)."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        embed_dim: int = 16,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (16,),
        resolution: int = 256,
        use_variational: bool = True,
        scaling_factor: float = TOKEN_SCALE,
    ) -> None:
        super().__init__()
        ch_mult = tuple(ch_mult)
        attn = _attn_levels(len(ch_mult), resolution, tuple(attn_resolutions))
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, attn, embed_dim)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, embed_dim)
        mult = 2 if use_variational else 1
        self.quant_conv = nn.Conv2d(2 * embed_dim, mult * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """``quant_conv(encoder(images))``: ``[B, 2 embed_dim, h, w]`` (the posterior's parameters)."""
        moments = self.quant_conv(self.encoder(images))
        if not self.config.use_variational:
            moments = torch.cat([moments, torch.ones_like(moments)], 1)
        return moments

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mean, logvar)`` ``[B, embed_dim, h, w]`` each (logvar clamped to [-30, 20])."""
        mean, logvar = torch.chunk(self.encode_moments(images), 2, dim=1)
        return mean, torch.clamp(logvar, -30.0, 20.0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``latents [B, embed_dim, h, w]`` (unscaled) -> images ``[B, 3, 16h, 16w]`` in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents))
