"""LlamaGen's VQ image tokenizer (Sun et al. 2024, arXiv 2406.06525; a VQGAN-style CNN).

Module and parameter names are the official ones (``tokenizer/tokenizer_image/vq_model.py`` of
FoundationVision/LlamaGen), so official state dicts (including the ``quantize.codebook_used``
usage buffer) load strictly. Only inference is implemented: the losses and the usage statistics
of training mode are not.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..component_mixin import ComponentMixin

# Official ``codebook_used`` length (a rolling window of recently used indices, train mode only).
CODEBOOK_USAGE_WINDOW = 65536


def _group_norm(channels: int) -> nn.GroupNorm:
    """Official ``Normalize``: GroupNorm with 32 groups, eps 1e-6, affine."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> dropout -> conv3x3, plus a 1x1 ``nin_shortcut``
    when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, H, W] -> [B, C_out, H, W]
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the ``H*W`` positions (1x1 conv q/k/v/proj_out), residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        batch, channels, height, width = x.shape
        h = self.norm(x)
        q, k, v = (
            proj(h).reshape(batch, 1, channels, height * width).transpose(2, 3) for proj in (self.q, self.k, self.v)
        )
        # SDPA's default scale is C**-0.5, the official scale.
        out = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C]
        return x + self.proj_out(out.transpose(2, 3).reshape(batch, channels, height, width))


class Downsample(nn.Module):
    """Zero-pad right/bottom by 1, then 3x3 conv with stride 2 (official asymmetric padding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ConvLevel(nn.Module):
    """One resolution level: ``res`` blocks and ``attn`` blocks (one after each resnet block, only at
    the lowest resolution; empty elsewhere)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, with_attn: bool, dropout: float) -> None:
        super().__init__()
        self.res = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, dropout) for i in range(num_blocks)
        )
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks if with_attn else 0))

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class EncoderLevel(ConvLevel):
    """Encoder level followed by ``downsample`` (an ``nn.Identity``, absent from the state dict, at
    the last level)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, is_last: bool, dropout: float) -> None:
        super().__init__(in_channels, out_channels, num_blocks, with_attn=is_last, dropout=dropout)
        self.downsample = nn.Identity() if is_last else Downsample(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.run_blocks(x))


class DecoderLevel(ConvLevel):
    """Decoder level followed by ``upsample`` (an ``nn.Identity`` at the last, full-resolution level)."""

    def __init__(
        self, in_channels: int, out_channels: int, num_blocks: int, is_lowest: bool, is_last: bool, dropout: float
    ) -> None:
        super().__init__(in_channels, out_channels, num_blocks, with_attn=is_lowest, dropout=dropout)
        self.upsample = nn.Identity() if is_last else Upsample(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.run_blocks(x))


def _mid_blocks(channels: int, dropout: float) -> nn.ModuleList:
    """Official middle section: resnet, attention, resnet."""
    return nn.ModuleList(
        [ResnetBlock(channels, channels, dropout), AttnBlock(channels), ResnetBlock(channels, channels, dropout)]
    )


class Encoder(nn.Module):
    """Image ``[B, 3, H, W]`` -> latent ``[B, z_channels, H/f, W/f]``, ``f = 2**(len(ch_mult)-1)``."""

    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int, dropout: float) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, kernel_size=3, padding=1)
        last = len(ch_mult) - 1
        widths = [ch] + [ch * m for m in ch_mult]
        self.conv_blocks = nn.ModuleList(
            EncoderLevel(widths[i], widths[i + 1], num_res_blocks, is_last=i == last, dropout=dropout)
            for i in range(len(ch_mult))
        )
        self.mid = _mid_blocks(widths[-1], dropout)
        self.norm_out = _group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``[B, z_channels, h, w]`` -> image ``[B, 3, h*f, w*f]``; ``conv_blocks.0`` is the LOWEST
    resolution level (official order), each level has ``num_res_blocks + 1`` resnet blocks."""

    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int, dropout: float) -> None:
        super().__init__()
        widths = [ch * m for m in reversed(ch_mult)]
        self.conv_in = nn.Conv2d(z_channels, widths[0], kernel_size=3, padding=1)
        self.mid = _mid_blocks(widths[0], dropout)
        last = len(ch_mult) - 1
        self.conv_blocks = nn.ModuleList(
            DecoderLevel(
                widths[max(i - 1, 0)],
                widths[i],
                num_res_blocks + 1,
                is_lowest=i == 0,
                is_last=i == last,
                dropout=dropout,
            )
            for i in range(len(ch_mult))
        )
        self.norm_out = _group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 3, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(_swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codebook-row quantiser with optional L2-normalised latents and codes (LlamaGen uses
    cosine-similarity codes, ``codebook_l2_norm=True``)."""

    def __init__(self, codebook_size: int, embed_dim: int, l2_norm: bool, show_usage: bool) -> None:
        super().__init__()
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        if show_usage:
            # Training-time usage statistics; kept so official state dicts load strictly.
            self.register_buffer("codebook_used", torch.zeros(CODEBOOK_USAGE_WINDOW))

    def codebook(self) -> torch.Tensor:
        """Codebook rows ``[K, C]`` as used for lookup (L2-normalised when ``l2_norm``)."""
        weight = self.embedding.weight
        return F.normalize(weight, p=2, dim=-1) if self.l2_norm else weight

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantise a latent ``[B, C, h, w]``; returns ``(quant [B, C, h, w], indices [B, h, w])``."""
        batch, channels, height, width = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, channels)
        if self.l2_norm:
            flat = F.normalize(flat, p=2, dim=-1)
        codebook = self.codebook()
        # Official distance |z|^2 + |e|^2 - 2 z.e (same formula, so near-ties resolve the same way).
        dist = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
        indices = dist.argmin(dim=1)
        # Straight-through estimator (van den Oord et al. 2017), as the official quantiser.
        quant = flat + (codebook[indices] - flat).detach()
        quant = quant.view(batch, height, width, channels).permute(0, 3, 1, 2)
        return quant, indices.view(batch, height, width)


class LlamaGenVQ(ComponentMixin, ModelMixin, ConfigMixin):
    """LlamaGen VQ tokenizer: ``encoder -> quant_conv -> quantize`` and
    ``post_quant_conv -> decoder``. Images are ``[B, 3, H, W]`` in ``[-1, 1]``.

    Args:
        codebook_size, codebook_embed_dim: codebook rows / width (official VQ-16: 16384 x 8).
        codebook_l2_norm: cosine codebook (official True).
        codebook_show_usage: whether the ``quantize.codebook_used`` buffer exists (official True).
        encoder_ch_mult, decoder_ch_mult: width multipliers per level; downsampling factor
            ``2**(len(ch_mult)-1)`` (VQ-16: ``[1, 1, 2, 2, 4]``, VQ-8: ``[1, 2, 2, 4]``).
        z_channels: encoder output / decoder input width.
        ch: base width (official constructor default 128; ``VQModel`` never changes it).
        num_res_blocks: resnet blocks per encoder level (decoder levels have one more).
        dropout: dropout inside resnet blocks (official 0).
    """

    @register_to_config
    def __init__(
        self,
        codebook_size: int = 16384,
        codebook_embed_dim: int = 8,
        codebook_l2_norm: bool = True,
        codebook_show_usage: bool = True,
        encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        z_channels: int = 256,
        ch: int = 128,
        num_res_blocks: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(ch, tuple(encoder_ch_mult), num_res_blocks, z_channels, dropout)
        self.decoder = Decoder(ch, tuple(decoder_ch_mult), num_res_blocks, z_channels, dropout)
        self.quantize = VectorQuantizer(codebook_size, codebook_embed_dim, codebook_l2_norm, codebook_show_usage)
        self.quant_conv = nn.Conv2d(z_channels, codebook_embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(codebook_embed_dim, z_channels, kernel_size=1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.encoder_ch_mult) - 1)

    def codebook_embeddings(self) -> torch.Tensor:
        """Codebook rows ``[K, C]`` exactly as the decoder sees them (L2-normalised when
        ``codebook_l2_norm``); LANTERN's latent neighbourhoods are built from these."""
        return self.quantize.codebook()

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``[B, 3, H, W]`` in [-1, 1] -> ``(quant [B, C, H/f, W/f], indices [B, H/f, W/f])``."""
        return self.quantize(self.quant_conv(self.encoder(images)))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """Quantised latent ``[B, C, h, w]`` -> images ``[B, 3, h*f, w*f]`` (not clamped, as official)."""
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(
        self,
        indices: torch.Tensor,  # [B, h, w] or [B, h*w] raster order
        grid_size: int | tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Code indices -> images ``[B, 3, h*f, w*f]`` (official ``decode_code``, not clamped).

        ``grid_size`` gives ``(h, w)`` (or the side of a square grid) for flat ``[B, h*w]`` indices;
        None infers a square grid.
        """
        if indices.dim() == 3:
            height, width = indices.shape[1:]
        elif isinstance(grid_size, tuple):
            height, width = grid_size
        else:
            height = width = grid_size if grid_size is not None else math.isqrt(indices.shape[1])
        if indices.dim() not in (2, 3) or height * width != indices[0].numel():
            raise ValueError(f"cannot lay out indices {tuple(indices.shape)} on a {height}x{width} grid")
        rows = self.codebook_embeddings()[indices.reshape(indices.shape[0], height, width).long()]  # [B, h, w, C]
        return self.decode(rows.permute(0, 3, 1, 2).contiguous())
