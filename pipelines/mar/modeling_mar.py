"""MAR (Li et al. 2024, "Autoregressive Image Generation without Vector Quantization", arXiv
2406.11838) as a diffusers component: the MAE-style encoder/decoder over continuous VAE tokens
with the class buffer (§3.3, Fig. 3), and the per-token diffusion head ("DiffLoss", §3.2, Eq. 1-2:
a small MLP with adaLN, epsilon prediction and learned-range variance) with its respaced cosine
diffusion sampler.

Parameter names are those of the official ``models/mar.py`` / ``models/diffloss.py`` (state dicts
of the official checkpoints load without renaming); the transformer block is timm's ``Block``
(pre-norm attention + MLP, ``attn.qkv`` / ``attn.proj`` / ``mlp.fc1`` / ``mlp.fc2``), reimplemented
here. The arithmetic follows the official code step for step (see
``../shared/fixtures/mar/README.md``), so that it reproduces the official outputs to float32
tolerance: the schedule arrays are float64 and rounded to float32 per step, like the official
``_extract_into_tensor``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..component_mixin import ComponentMixin

# --------------------------------------------------------------------------------------------
# Transformer block (timm ``Block`` with the official MAR settings: qkv bias, exact GELU)
# --------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, T, D]``; ``key_mask [B, T]`` (True = may be attended to; None = all)."""
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, T, D/H] each
        mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, T]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(x.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


# --------------------------------------------------------------------------------------------
# Diffusion head (official ``SimpleMLPAdaLN`` under ``diffloss.net``)
# --------------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        """Sinusoid ``[N, dim]`` of timesteps ``t [N]``: ``[cos(t f), sin(t f)]`` (cos first)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 2 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """The denoising MLP ``(x_t [N, C], t [N], z [N, Z]) -> [N, 2C]`` = ``[eps | v]`` (MAR §3.2)."""

    def __init__(
        self, in_channels: int, model_channels: int, out_channels: int, z_channels: int, num_res_blocks: int
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, cfg_scale) -> torch.Tensor:
        """The official CFG call on ``2M`` rows ``[cond | uncond]``: the first half of ``x`` is run
        under both conditions; eps is guided and duplicated, the variance channels are not."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, c)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels :]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


class DiffLoss(nn.Module):
    """Holder with the official name (``diffloss.net``) of the diffusion MLP, and one reverse step
    of the respaced sampling diffusion as its ``forward`` (the official ``DiffLoss`` holds its
    diffusions too).

    The step is graph-capturable: the schedule's float32 per-step values are tables (non-persistent
    buffers, so state dicts are the official ones) indexed by a step *tensor*, so one compiled
    graph (or CUDA graph) serves every step of the loop; no host syncs, no data-dependent shapes.
    """

    def __init__(
        self,
        target_channels: int,
        z_channels: int,
        depth: int,
        width: int,
        num_sampling_steps: str = "100",
        clip_denoised: float | None = None,
    ) -> None:
        super().__init__()
        self.net = SimpleMLPAdaLN(target_channels, width, target_channels * 2, z_channels, depth)
        self.clip_denoised = clip_denoised
        self.schedule = GaussianDiffusionSchedule(num_sampling_steps)
        sched = self.schedule
        loop = list(reversed(range(sched.num_steps)))  # loop position i is respaced step t = S-1-i
        # [S, 6] float32: what the official `_extract_into_tensor` yields at each loop position
        table = torch.stack([sched._f32[name][loop] for name in self.COEFFICIENTS], dim=1)
        self.register_buffer("step_coefficients", table, persistent=False)
        self.register_buffer(
            "step_timesteps", torch.from_numpy(sched.timestep_map[loop].copy()).long(), persistent=False
        )
        self.register_buffer("step_index", torch.arange(sched.num_steps), persistent=False)

    COEFFICIENTS = (
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "posterior_log_variance_clipped",
        "log_betas",
    )

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, cfg_scale: torch.Tensor, step: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reverse step at loop position ``step`` (``[1]`` long tensor; respaced t = S-1-step) for
        ``x [N, C]``: ``(mean, log_variance)`` ``[N, C]`` of p(x_{t-1} | x_t) (official
        ``p_mean_variance``: learned-range variance, epsilon prediction, no clipping).

        ``cond`` is ``[N, Z]`` (no guidance) or ``[2N, Z]`` = ``[cond ; null]``: then both halves
        run on ``x`` and eps is guided by ``cfg_scale [N, 1]`` (official ``forward_with_cfg``);
        the variance channels are the conditional rows'.
        """
        n, channels = x.shape
        # index_select, not [step]: indexing with a tensor scalar reads it on the host (a sync)
        coef = self.step_coefficients.index_select(0, step)[0]  # [6]
        ts = self.step_timesteps.index_select(0, step).expand(cond.shape[0])
        if cond.shape[0] == n:
            out = self.net(x, ts, cond)
            eps, v = out[:, :channels], out[:, channels:]
        else:
            raw = self.net(torch.cat([x, x]), ts, cond)
            cond_eps, null_eps = raw[:n, :channels], raw[n:, :channels]
            eps = null_eps + cfg_scale * (cond_eps - null_eps)
            v = raw[:n, channels:]
        frac = (v + 1) / 2
        log_variance = frac * coef[5] + (1 - frac) * coef[4]
        pred_xstart = coef[0] * x - coef[1] * eps
        if self.clip_denoised is not None:  # DDPM's clip_denoised at a token range (off in official MAR)
            pred_xstart = pred_xstart.clamp(-self.clip_denoised, self.clip_denoised)
        mean = coef[2] * pred_xstart + coef[3] * x
        return mean, log_variance


# --------------------------------------------------------------------------------------------
# Respaced cosine diffusion (official diffusion/{gaussian_diffusion,respace}.py arithmetic)
# --------------------------------------------------------------------------------------------


def cosine_betas(num_timesteps: int = 1000, max_beta: float = 0.999) -> np.ndarray:
    """float64 betas of the cosine schedule (Nichol & Dhariwal 2021, Eq. 17)."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [
            min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
            for i in range(num_timesteps)
        ],
        dtype=np.float64,
    )


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> set[int]:
    """The kept timesteps of a respaced diffusion: ``"ddimN"`` (an even stride giving N steps) or
    comma-separated section counts (each section evenly spaced with Python rounding)."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count or count < 1:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return set(steps)


class GaussianDiffusionSchedule:
    """The sampling diffusion of MAR's head: 1000-step cosine betas respaced to
    ``num_sampling_steps`` (official ``create_diffusion(timestep_respacing=..., noise_schedule="cosine")``),
    epsilon prediction, learned-range variance, no clipping. float64 arrays (``gen_*`` of the
    fixtures); ``coef(name, t)`` gives the float32 per-step scalar the official code multiplies with."""

    def __init__(self, num_sampling_steps: str = "100", num_timesteps: int = 1000) -> None:
        base = np.cumprod(1.0 - cosine_betas(num_timesteps))
        use = space_timesteps(num_timesteps, str(num_sampling_steps))
        betas, timestep_map, last = [], [], 1.0
        for i, abar in enumerate(base):
            if i in use:
                betas.append(1 - abar / last)
                last = abar
                timestep_map.append(i)
        self.timestep_map = np.array(timestep_map, dtype=np.int64)
        self.betas = np.array(betas, dtype=np.float64)
        self.num_steps = len(self.betas)
        alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if self.num_steps > 1
            else np.array([], dtype=np.float64)
        )
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(self.betas)
        # float32 per-step coefficients (what `_extract_into_tensor` yields), [S] each
        self._f32 = {
            name: torch.from_numpy(getattr(self, name)).float()
            for name in (
                "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod",
                "posterior_mean_coef1",
                "posterior_mean_coef2",
                "posterior_log_variance_clipped",
                "log_betas",
            )
        }

    def coef(self, name: str, t: int) -> float:
        """float32 value of schedule array ``name`` at respaced step ``t`` (a Python float holding
        a float32 number)."""
        return float(self._f32[name][t])

    def p_mean_variance(self, model_output: torch.Tensor, x: torch.Tensor, t: int) -> dict:
        """One reverse step's Gaussian from the MLP output ``[N, 2C]`` at ``x_t [N, C]``
        (respaced index ``t``): mean, log_variance (learned range, v not clamped), pred_xstart."""
        channels = x.shape[-1]
        eps, v = model_output[:, :channels], model_output[:, channels:]
        min_log = self.coef("posterior_log_variance_clipped", t)
        max_log = self.coef("log_betas", t)
        frac = (v + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = self.coef("sqrt_recip_alphas_cumprod", t) * x - self.coef("sqrt_recipm1_alphas_cumprod", t) * eps
        mean = self.coef("posterior_mean_coef1", t) * pred_xstart + self.coef("posterior_mean_coef2", t) * x
        return {
            "mean": mean,
            "log_variance": log_variance,
            "variance": torch.exp(log_variance),
            "pred_xstart": pred_xstart,
        }


# --------------------------------------------------------------------------------------------
# The MAR model
# --------------------------------------------------------------------------------------------


@dataclass
class TokenGaussian:
    """The diffusion head's result for ``N`` tokens: ``tokens [N, C]`` (the official sample: the
    last step's mean, or a draw from its Gaussian), and that last reverse step's Gaussian
    ``mean`` / ``std [N, C]`` (``std`` = temperature * exp(0.5 log_variance); CSpD's density)."""

    tokens: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


class MARModel(ComponentMixin, ModelMixin, ConfigMixin):
    """MAR's masked autoregressive transformer and diffusion head (official ``models/mar.py::MAR``
    at inference; dropout, label drop and the training losses are not part of it).

    ``clip_denoised`` (not an official field; None = official): clamp the head's predicted x0 to
    ``[-c, c]`` at every reverse step (DDPM's ``clip_denoised`` at the tokens' range). The first
    respaced step of the cosine schedule multiplies the epsilon error by ~600 (50 steps); the
    official models predict epsilon precisely enough there, small briefly-trained ones (the
    embedded pair) do not and their trajectories diverge without it.

    Tokens are ``[B, seq_len, token_embed_dim]`` (patchified VAE latents scaled by
    the VAE's ``scaling_factor``); a mask ``[B, seq_len]`` is 1 (True) at unknown tokens.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        img_size: int = 256,
        vae_stride: int = 16,
        patch_size: int = 1,
        encoder_embed_dim: int = 1024,
        encoder_depth: int = 16,
        encoder_num_heads: int = 16,
        decoder_embed_dim: int = 1024,
        decoder_depth: int = 16,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        vae_embed_dim: int = 16,
        class_num: int = 1000,
        buffer_size: int = 64,
        diffloss_d: int = 3,
        diffloss_w: int = 1024,
        num_sampling_steps: str = "100",
        clip_denoised: float | None = None,
    ) -> None:
        super().__init__()
        if img_size % (vae_stride * patch_size):
            raise ValueError(
                f"img_size {img_size} is not a multiple of vae_stride * patch_size = {vae_stride * patch_size}"
            )
        self.seq_h = self.seq_w = img_size // vae_stride // patch_size
        self.seq_len = self.seq_h * self.seq_w
        self.token_embed_dim = vae_embed_dim * patch_size**2
        self.buffer_size = buffer_size
        self.class_emb = nn.Embedding(class_num, encoder_embed_dim)
        self.fake_latent = nn.Parameter(torch.zeros(1, encoder_embed_dim))
        self.z_proj = nn.Linear(self.token_embed_dim, encoder_embed_dim)
        self.z_proj_ln = nn.LayerNorm(encoder_embed_dim, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + buffer_size, encoder_embed_dim))
        self.encoder_blocks = nn.ModuleList(
            [Block(encoder_embed_dim, encoder_num_heads, mlp_ratio) for _ in range(encoder_depth)]
        )
        self.encoder_norm = nn.LayerNorm(encoder_embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(encoder_embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + buffer_size, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, decoder_embed_dim))
        self.diffloss = DiffLoss(
            self.token_embed_dim, decoder_embed_dim, diffloss_d, diffloss_w, num_sampling_steps, clip_denoised
        )
        for p in self.parameters():  # MAR's own init is a training matter; random small weights here
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    # ---------------------------------------------------------------- patchify (official layout)
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, c, H, W]`` latents -> ``[B, (H/p)(W/p), c p p]`` tokens (row-major patches,
        channel-major inside a patch)."""
        b, c, h, w = x.shape
        p = self.config.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwcpq", x)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`patchify`: ``[B, seq_len, C]`` -> ``[B, vae_embed_dim, seq_h p, seq_w p]``."""
        b = x.shape[0]
        p, c = self.config.patch_size, self.config.vae_embed_dim
        x = x.reshape(b, self.seq_h, self.seq_w, c, p, p)
        x = torch.einsum("nhwcpq->nchpwq", x)
        return x.reshape(b, c, self.seq_h * p, self.seq_w * p)

    # ---------------------------------------------------------------- MAE encoder / decoder
    def class_embedding(self, labels: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """``[B, enc_dim]``: ``class_emb(labels)``, or the learned null embedding ``fake_latent``
        for ``labels=None`` (unconditional; also CFG's null branch)."""
        if labels is None:
            return self.fake_latent.repeat(batch_size, 1)
        return self.class_emb(labels)

    def _keep(self, mask: torch.Tensor) -> torch.Tensor:
        """``[B, buffer + L]`` True at the class buffer and the known tokens of ``mask [B, L]``."""
        buffer = torch.ones(mask.shape[0], self.buffer_size, dtype=torch.bool, device=mask.device)
        return torch.cat([buffer, ~mask.bool()], dim=1)

    def forward_mae_encoder(self, x: torch.Tensor, mask: torch.Tensor, class_embedding: torch.Tensor) -> torch.Tensor:
        """``x [B, L, C]``, ``mask [B, L]`` (1 = unknown), ``class_embedding [B, enc_dim]`` ->
        ``[B, buffer + L, enc_dim]``.

        Static shapes (graph-capturable): the official encoder drops the unknown tokens and runs on
        the ``buffer + #known`` rest; here every position runs and attention may only look at the
        buffer and the known tokens, which gives the kept rows the official values (to float
        rounding: LayerNorm and the MLP act per row, and masked keys get exactly zero weight). The
        rows of unknown tokens are computed and never used (:meth:`forward_mae_decoder` replaces
        them with the mask token). ``[keep]`` of the result (:meth:`_keep`) is the official output.
        """
        x = self.z_proj(x)
        b, _, d = x.shape
        buffer = class_embedding[:, None, :].expand(b, self.buffer_size, d).to(x.dtype)  # the class buffer
        x = torch.cat([buffer, x], dim=1) + self.encoder_pos_embed_learned
        x = self.z_proj_ln(x)
        keep = self._keep(mask)
        for block in self.encoder_blocks:
            x = block(x, keep)
        return self.encoder_norm(x)

    def forward_mae_decoder(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder output ``[B, buffer + L, enc_dim]`` + ``mask [B, L]`` -> ``z [B, L, dec_dim]``
        (the head's condition): unknown positions become the mask token, all positions attend."""
        x = self.decoder_embed(x)
        keep = self._keep(mask)
        x = torch.where(keep[..., None], x, self.mask_token.to(x.dtype)) + self.decoder_pos_embed_learned
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)[:, self.buffer_size :]
        return x + self.diffusion_pos_embed_learned

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None, cfg: bool = False
    ) -> torch.Tensor:
        """One MAE pass: ``z [B, L, dec_dim]``, or ``[2B, L, dec_dim]`` = ``[cond ; null]`` with ``cfg``
        (the batch the official ``sample_tokens`` runs under guidance)."""
        b = tokens.shape[0]
        emb = self.class_embedding(labels, b)
        if cfg:
            tokens = torch.cat([tokens, tokens])
            mask = torch.cat([mask, mask])
            emb = torch.cat([emb, self.fake_latent.repeat(b, 1)])
        return self.forward_mae_decoder(self.forward_mae_encoder(tokens, mask, emb), mask)

    # ---------------------------------------------------------------- the diffusion head
    @property
    def schedule(self) -> GaussianDiffusionSchedule:
        """The head's respaced sampling diffusion."""
        return self.diffloss.schedule

    def sample_head(
        self,
        z: torch.Tensor,
        z_null: torch.Tensor | None,
        cfg_scale: torch.Tensor | float,
        temperature: float,
        noise_init: torch.Tensor,
        noise_steps: torch.Tensor,
        sample_last_step: bool = False,
    ) -> TokenGaussian:
        """Sample ``N`` tokens with the diffusion head (official ``DiffLoss.sample`` for the
        conditional rows) from given noises: ``S`` calls of the step :meth:`DiffLoss.forward`
        (one graph for all of them when compiled).

        Args:
            z / z_null: ``[N, dec_dim]`` conditions (``z_null`` None: no guidance).
            cfg_scale: a float or ``[N, 1]`` per token (guidance on eps only, as the official
                ``forward_with_cfg``).
            noise_init: ``[N, C]`` x_T; noise_steps: ``[S, N, C]`` the per-step noises in loop
                order (t = S-1 ... 0; the t = 0 one is only used with ``sample_last_step``).
            sample_last_step: False (official): the token is the last step's mean; True: a draw
                ``mean + temperature * std_0 * noise_steps[-1]`` from the last step's Gaussian
                (what CSpD's densities describe).
        """
        head = self.diffloss
        dtype = head.net.input_proj.weight.dtype
        x, noise_steps = noise_init.to(dtype), noise_steps.to(dtype)
        n = x.shape[0]
        cond = z.to(dtype) if z_null is None else torch.cat([z, z_null]).to(dtype)
        if not isinstance(cfg_scale, torch.Tensor):
            cfg_scale = torch.tensor(float(cfg_scale))
        cfg_scale = cfg_scale.to(device=x.device, dtype=dtype).expand(n, 1)
        num_steps = self.schedule.num_steps
        for i in range(num_steps):
            mean, log_variance = head(x, cond, cfg_scale, head.step_index[i : i + 1])
            if i < num_steps - 1:
                x = mean + torch.exp(0.5 * log_variance) * noise_steps[i] * temperature
        # A copy: under CUDA graphs the step's outputs live in memory the next replay overwrites.
        mean = mean.clone()
        std = torch.exp(0.5 * log_variance) * temperature
        tokens = mean + torch.exp(0.5 * log_variance) * noise_steps[-1] * temperature if sample_last_step else mean
        return TokenGaussian(tokens=tokens, mean=mean, std=std)


def mask_ratio_schedule(num_iter: int, seq_len: int) -> list[int]:
    """The official cosine mask schedule without the clamp: ``floor(seq_len * cos(pi/2 (k+1) / num_iter))``
    for steps ``k = 0 .. num_iter-1`` (float64, evaluated in the official order)."""
    return [int(np.floor(seq_len * np.cos(math.pi / 2.0 * (k + 1) / num_iter))) for k in range(num_iter)]


@dataclass
class MARStep:
    """One AR step of the official schedule: ``mask_len_next`` (masked tokens per row after the
    step), ``num_pred`` (tokens predicted per row) and ``cfg`` (this step's guidance, float32)."""

    mask_len_next: int
    num_pred: int
    cfg: float


def mar_schedule(num_iter: int, seq_len: int, guidance_scale: float, cfg_schedule: str) -> list[MARStep]:
    """Per-step counts and guidance of the official ``sample_tokens`` (MAR §3.4: cosine masking
    schedule; linear CFG schedule ``1 + (cfg - 1)(L - mask_len_next)/L``)."""
    if cfg_schedule not in ("linear", "constant"):
        raise ValueError(f"cfg_schedule must be 'linear' or 'constant', got {cfg_schedule!r}")
    if not isinstance(num_iter, int) or num_iter < 1:
        raise ValueError(f"num_iter must be an integer >= 1, got {num_iter!r}")
    steps, masked = [], seq_len
    for k, raw in enumerate(mask_ratio_schedule(num_iter, seq_len)):
        mask_len = max(1, min(masked - 1, raw))
        num_pred = masked if k == num_iter - 1 else masked - mask_len
        if cfg_schedule == "linear":  # float32 tensor arithmetic, in the official order
            remaining = seq_len - torch.tensor(float(mask_len), dtype=torch.float32)
            cfg = float(1 + (guidance_scale - 1) * remaining / seq_len)
        else:
            cfg = guidance_scale
        steps.append(MARStep(mask_len, num_pred, cfg))
        masked = mask_len if k < num_iter - 1 else 0
    return steps
