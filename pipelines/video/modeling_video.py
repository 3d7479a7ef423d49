"""A block-causal video diffusion transformer (CausVid / Self-Forcing layout, arXiv 2412.07772,
2506.08009, at toy scale) and its KV cache.

A video is a sequence of blocks of ``frames_per_block`` latent frames. Tokens are ``patch_size``
patches of the latent frames; within a block attention is bidirectional, across blocks causal
(block ``i`` sees the class token and the clean blocks ``< i``). Every token carries its own
conditioning vector (class embedding + embedding of the token's noise level ``t``) that drives
adaLN-Zero modulation (DiT, arXiv 2212.09748), so the cached clean blocks (``t = 0``) and the block
being denoised (``t > 0``) go through one forward. The network predicts the flow-matching velocity
``v = noise - x0`` of ``x_t = (1 - t) x0 + t noise`` (rectified flow, arXiv 2209.03003).

Two ways to run it, equal by construction (tested):

* cached (generation): :meth:`BlockCausalVideoTransformer.prefill` writes the class token into a
  :class:`VideoKVCache`; :meth:`~BlockCausalVideoTransformer.forward` on one block reads the cache
  and, with ``write=True``, appends the block's keys/values (the clean block at ``t = 0``: one
  forward, CausVid's cache update);
* full masked (training, :meth:`~BlockCausalVideoTransformer.forward_teacher`): one forward over
  ``[class ; clean blocks ; noisy blocks]`` with the mask of :func:`teacher_forcing_mask`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..component_mixin import ComponentMixin


@dataclass
class VideoKVCache:
    """Keys and values of every layer, ``[B, heads, max_tokens, head_dim]`` each, filled to
    ``length`` (the class token, then whole blocks). Rows are ``[cond ; uncond]`` under CFG.
    Rolling back is moving ``length``: slots past it are invisible and overwritten by the next write."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(
        cls, num_layers: int, batch: int, heads: int, max_tokens: int, head_dim: int, device, dtype
    ) -> VideoKVCache:
        shape = (batch, heads, max_tokens, head_dim)
        return cls(
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)],
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)],
        )

    def truncate(self, length: int) -> None:
        """Roll back to the first ``length`` tokens."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll a cache of {self.length} tokens back to {length}")
        self.length = length


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:  # [...] -> [..., dim]
    """Sinusoidal embedding of noise levels ``t`` in [0, 1] (scaled by 1000, as DiT's)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[..., None] * 1000.0 * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def teacher_forcing_mask(num_blocks: int, tokens_per_block: int, device=None) -> torch.Tensor:
    """``[N, N]`` bool (True = may attend) over ``[class ; clean blocks ; noisy blocks]``,
    ``N = 1 + 2 * num_blocks * tokens_per_block``: clean block ``i`` sees the class token and clean
    blocks ``<= i``; noisy block ``i`` sees the class token, clean blocks ``< i`` and itself — what
    the cached forward of block ``i`` sees at generation."""
    block = torch.arange(num_blocks, device=device).repeat_interleave(tokens_per_block)  # [n]
    clean_clean = block[:, None] >= block[None, :]
    noisy_clean = block[:, None] > block[None, :]
    noisy_noisy = block[:, None] == block[None, :]
    n = block.numel()
    mask = torch.zeros(1 + 2 * n, 1 + 2 * n, dtype=torch.bool, device=device)
    mask[:, 0] = True
    mask[1 : 1 + n, 1 : 1 + n] = clean_clean
    mask[1 + n :, 1 : 1 + n] = noisy_clean
    mask[1 + n :, 1 + n :] = noisy_noisy
    return mask


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class _Block(nn.Module):
    """Pre-norm transformer block with per-token adaLN-Zero (shift, scale, gate for attention and MLP)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.modulation = nn.Linear(dim, 6 * dim)

    def forward(
        self,
        x: torch.Tensor,  # [B, N, D]
        cond: torch.Tensor,  # [B, N, D] per-token conditioning (class + noise level)
        mask: torch.Tensor | None,  # [N, S + N] bool, or None: everything visible
        cache: VideoKVCache | None,
        layer: int,
        write: bool,
    ) -> torch.Tensor:
        b, n, d = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(cond)).chunk(6, dim=-1)
        q, k, v = self.qkv(_modulate(self.norm1(x), shift1, scale1)).view(b, n, 3, self.heads, -1).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, hd]
        if cache is not None:
            start = cache.length
            if write:  # this block's keys become permanent context (length moves after all layers)
                cache.keys[layer][:, :, start : start + n] = k
                cache.values[layer][:, :, start : start + n] = v
                keys, values = cache.keys[layer][:, :, : start + n], cache.values[layer][:, :, : start + n]
            else:
                keys = torch.cat([cache.keys[layer][:, :, :start], k], dim=2)
                values = torch.cat([cache.values[layer][:, :, :start], v], dim=2)
        else:
            keys, values = k, v
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        x = x + gate1 * self.proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + gate2 * self.fc2(F.gelu(self.fc1(_modulate(self.norm2(x), shift2, scale2)), approximate="tanh"))


class BlockCausalVideoTransformer(ComponentMixin, ModelMixin, ConfigMixin):
    """Class-conditional block-causal video transformer over latent frames ``[C, h, w]``.

    Args:
        num_classes: classes; label ``num_classes`` is the null class (classifier-free guidance).
        latent_channels, latent_size: the latent frame the VAE makes (``[C, h, w]``, ``h = w``).
        patch_size: latent pixels per token side.
        frames_per_block: latent frames generated together (one block).
        max_frames: the longest video (learned frame-position embeddings).
        dim, depth, heads, mlp_ratio: transformer width, layers, attention heads, MLP expansion.
        class_names: caption text of each class (what prompts and scorers read).
    """

    @register_to_config
    def __init__(
        self,
        num_classes: int = 16,
        latent_channels: int = 4,
        latent_size: int = 8,
        patch_size: int = 2,
        frames_per_block: int = 2,
        max_frames: int = 8,
        dim: int = 96,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        if latent_size % patch_size:
            raise ValueError(f"latent_size {latent_size} is not a multiple of patch_size {patch_size}")
        if max_frames % frames_per_block:
            raise ValueError(f"max_frames {max_frames} is not a whole number of {frames_per_block}-frame blocks")
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names for {num_classes} classes")
        self.tokens_per_frame = (latent_size // patch_size) ** 2
        patch_dim = latent_channels * patch_size * patch_size
        self.patch_embed = nn.Linear(patch_dim, dim)
        self.frame_pos = nn.Parameter(torch.zeros(max_frames, dim))
        self.space_pos = nn.Parameter(torch.zeros(self.tokens_per_frame, dim))
        self.class_embed = nn.Embedding(num_classes + 1, dim)
        self.class_token = nn.Parameter(torch.zeros(dim))
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation_out = nn.Linear(dim, 2 * dim)
        self.head = nn.Linear(dim, patch_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.frame_pos, std=0.02)
        nn.init.normal_(self.space_pos, std=0.02)
        nn.init.normal_(self.class_token, std=0.02)
        nn.init.normal_(self.class_embed.weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.modulation.weight)
            nn.init.zeros_(block.modulation.bias)
        nn.init.zeros_(self.modulation_out.weight)
        nn.init.zeros_(self.modulation_out.bias)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    # ------------------------------------------------------------------ shapes
    @property
    def tokens_per_block(self) -> int:
        return self.tokens_per_frame * self.config.frames_per_block

    @property
    def max_tokens(self) -> int:
        """Cache slots for the longest video: the class token and every frame's tokens."""
        return 1 + self.config.max_frames * self.tokens_per_frame

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.latent_channels, c.latent_size, c.latent_size)

    def new_cache(self, batch: int) -> VideoKVCache:
        """An empty cache for ``batch`` physical rows (``2 B`` under CFG)."""
        head_dim = self.config.dim // self.config.heads
        return VideoKVCache.empty(
            self.config.depth, batch, self.config.heads, self.max_tokens, head_dim, self.device, self.dtype
        )

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:  # [B, F, C, h, w] -> [B, F * T, C p p]
        b, f, c, h, w = latents.shape
        p = self.config.patch_size
        x = latents.reshape(b, f, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(b, f * (h // p) * (w // p), c * p * p)

    def unpatchify(self, tokens: torch.Tensor, frames: int) -> torch.Tensor:  # [B, F * T, C p p] -> [B, F, C, h, w]
        c, size = self.config.latent_channels, self.config.latent_size
        p, g = self.config.patch_size, self.config.latent_size // self.config.patch_size
        x = tokens.reshape(tokens.shape[0], frames, g, g, c, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return x.reshape(tokens.shape[0], frames, c, size, size)

    # ------------------------------------------------------------------ pieces
    def _embed(
        self,
        latents: torch.Tensor,  # [B, F, C, h, w]
        timesteps: torch.Tensor,  # [B, F] noise level of each frame
        class_labels: torch.Tensor,  # [B]
        first_frame: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, f = latents.shape[:2]
        if first_frame + f > self.config.max_frames:
            raise ValueError(f"frames {first_frame}..{first_frame + f - 1} exceed max_frames {self.config.max_frames}")
        if tuple(latents.shape[2:]) != self.latent_shape:
            raise ValueError(f"latent frames must be {self.latent_shape}, got {tuple(latents.shape[2:])}")
        pos = self.frame_pos[first_frame : first_frame + f, None] + self.space_pos[None]  # [F, T, D]
        x = self.patch_embed(self.patchify(latents.to(self.dtype))) + pos.reshape(1, -1, pos.shape[-1])
        t = timesteps.to(self.device)[:, :, None].expand(b, f, self.tokens_per_frame).reshape(b, -1)  # [B, F*T]
        cond = self.time_mlp(timestep_embedding(t, self.config.dim).to(self.dtype))
        return x, cond + self.class_embed(class_labels)[:, None]

    def _class_inputs(self, class_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The class token ``[B, 1, D]`` and its conditioning (the class at ``t = 0``)."""
        b = class_labels.shape[0]
        zero = torch.zeros(b, 1, device=self.device)
        cond = self.time_mlp(timestep_embedding(zero, self.config.dim).to(self.dtype))
        return self.class_token.expand(b, 1, -1), cond + self.class_embed(class_labels)[:, None]

    def _run(self, x, cond, mask, cache: VideoKVCache | None, write: bool) -> torch.Tensor:
        for layer, block in enumerate(self.blocks):
            x = block(x, cond, mask, cache, layer, write)
        if cache is not None and write:
            cache.length += x.shape[1]
        return x

    def _out(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:  # [B, N, D] -> [B, N, C p p]
        shift, scale = self.modulation_out(F.silu(cond)).chunk(2, dim=-1)
        return self.head(_modulate(self.norm_out(x), shift, scale))

    # ------------------------------------------------------------------ cached (generation)
    def prefill(self, class_labels: torch.Tensor, cache: VideoKVCache) -> None:  # class_labels [B]
        """Write the class token into an empty ``cache``."""
        if cache.length:
            raise ValueError("prefill needs an empty cache")
        x, cond = self._class_inputs(class_labels.to(self.device))
        self._run(x, cond, None, cache, write=True)

    def forward(
        self,
        latents: torch.Tensor,  # [B, F, C, h, w] one block
        timestep: torch.Tensor,  # [B] its noise level t in [0, 1]
        class_labels: torch.Tensor,  # [B]
        first_frame: int,
        cache: VideoKVCache,
        write: bool = False,
    ) -> torch.Tensor:
        """The velocity ``[B, F, C, h, w]`` of one block (frames ``first_frame ..``) given the cached
        context; ``write=True`` also appends the block's keys/values to ``cache`` (pass the clean
        block at ``t = 0`` for that)."""
        frames = latents.shape[1]
        x, cond = self._embed(latents, timestep[:, None].expand(-1, frames), class_labels.to(self.device), first_frame)
        x = self._run(x, cond, None, cache, write)
        return self.unpatchify(self._out(x, cond), frames)

    # ------------------------------------------------------------------ full masked (training)
    def forward_teacher(
        self,
        clean: torch.Tensor,  # [B, F, C, h, w] the whole video, clean
        noisy: torch.Tensor,  # [B, F, C, h, w] the same video noised per block
        timesteps: torch.Tensor,  # [B, num_blocks] each noisy block's t
        class_labels: torch.Tensor,  # [B]
    ) -> torch.Tensor:
        """Velocity ``[B, F, C, h, w]`` of every noisy block, each given the class and the clean
        blocks before it, in one forward (teacher forcing with :func:`teacher_forcing_mask`)."""
        b, frames = clean.shape[:2]
        fpb = self.config.frames_per_block
        if frames % fpb:
            raise ValueError(f"{frames} frames are not a whole number of {fpb}-frame blocks")
        labels = class_labels.to(self.device)
        per_frame = timesteps.repeat_interleave(fpb, dim=1)  # [B, F]
        x_clean, c_clean = self._embed(clean, torch.zeros_like(per_frame), labels, 0)
        x_noisy, c_noisy = self._embed(noisy, per_frame, labels, 0)
        x_cls, c_cls = self._class_inputs(labels)
        x = torch.cat([x_cls, x_clean, x_noisy], dim=1)
        cond = torch.cat([c_cls, c_clean, c_noisy], dim=1)
        mask = teacher_forcing_mask(frames // fpb, self.tokens_per_block, self.device)
        x = self._run(x, cond, mask, None, write=False)
        n = x_noisy.shape[1]
        return self.unpatchify(self._out(x[:, -n:], cond[:, -n:]), frames)
