"""The MAR reference pair (:mod:`mmspec.training.reference`, stages ``mar-vae``, ``mar-target``,
``mar-draft``): a small KL autoencoder and two class-conditional MARs sharing it, trained on the
same offline emoji data as the LlamaGen reference.

* :func:`train_mar_vae` — MAR's KL autoencoder architecture (:class:`MARAutoencoderKL`, LDM's
  KL-f autoencoder, Rombach et al. 2022) at a tiny width, trained with an L2 pixel reconstruction
  loss on a posterior sample plus a weighted KL term to N(0, I). LDM's perceptual (LPIPS) and GAN
  losses are left out: their pretrained networks are not available offline. The latent scale
  (``scaling_factor`` = 1 / std of the posterior means on training images) is set after training,
  as MAR's 0.2325 was measured for its KL-16.
* :func:`train_mar` — MAR's training objective (Li et al. 2024, arXiv 2406.11838, §3.2-3.4 and the
  official ``models/mar.py::forward``): per batch one mask ratio from a normal truncated to
  [0.7, 1] (mean 1, std 0.25), a random order per image, the MAE encoder over the known tokens and
  the class buffer (label dropped to the learned null embedding with probability 0.1), and the
  diffusion loss (Eq. 2) on the masked tokens, each repeated ``diffusion_batch_mul`` times with its
  own timestep. The loss is guided-diffusion's for a learned-range variance (Nichol & Dhariwal
  2021, §3.1: "hybrid" = epsilon MSE + the variational bound with the mean's gradient stopped;
  at t = 0 the discretised Gaussian log-likelihood), over the 1000-step cosine schedule, which
  is what the official ``create_diffusion(timestep_respacing="", noise_schedule="cosine")`` trains.
  Official initialisation (xavier linears, N(0, 0.02) embeddings, zero adaLN and output layers of
  the head), AdamW (β = (0.9, 0.95), weight decay 0.02), an EMA of the weights (the saved model).
  The draft is the same recipe at a smaller width and depth (:meth:`MARTrainConfig.draft`).

Both run through :func:`~mmspec.training.loop.run_training` (checkpoints, bit-for-bit resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..pipelines.mar import GaussianDiffusionSchedule, MARAutoencoderKL, MARModel, MARPipeline
from .loop import RUN_CONTROL_FIELDS, TrainRun, clip_and_step, cosine_schedule, param_groups, run_training
from .reference_data import EmojiDataConfig, render_images, to_model_range
from .saved import CLASSES_FILE


# ---------------------------------------------------------------------------------------- configs
@dataclass
class MARVAETrainConfig:
    """Settings of :func:`train_mar_vae`.

    Args:
        data: the emoji data.
        steps, batch_size, lr, warmup_steps, seed, grad_clip: optimisation (Adam, β = (0.9, 0.95),
            linear warm-up then cosine decay to 10 %).
        embed_dim, ch, ch_mult, num_res_blocks: :class:`MARAutoencoderKL` sizes (down-sampling
            ``2**(len(ch_mult)-1)``; GroupNorm needs widths that are multiples of 32).
        kl_weight: weight of the mean per-element KL to N(0, I) against the mean per-pixel L2 loss.
        checkpoint_dir, checkpoint_every, resume, progress: as in
            :class:`~mmspec.training.reference_vq.VQTrainConfig`.
    """

    data: EmojiDataConfig = field(default_factory=EmojiDataConfig)
    steps: int = 500
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 50
    seed: int = 0
    embed_dim: int = 8
    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    kl_weight: float = 1e-3
    grad_clip: float = 1.0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 250
    resume: bool = False
    progress: bool = True


@dataclass
class MARTrainConfig:
    """Settings of :func:`train_mar` (model sizes, MAR's objective, optimisation, checkpoints).

    Args:
        data: the emoji data (must be the VAE's).
        steps, batch_size, lr, warmup_steps, seed, grad_clip: optimisation (AdamW β = (0.9, 0.95),
            warm-up then cosine decay to 10 %).
        weight_decay: AdamW decay of matrices and embeddings (MAR: 0.02).
        ema_decay: decay of the weight EMA that is saved (with the usual ``(1 + t) / (10 + t)``
            warm-up, so that a short run's EMA is not dominated by the initialisation).
        embed_dim, depth, num_heads: width, encoder depth (= decoder depth) and heads of the MAE.
        buffer_size: class-buffer tokens (MAR: 64; a 64-token grid needs far fewer).
        diffloss_d, diffloss_w: the diffusion head's residual blocks and width.
        num_sampling_steps: the head's respaced sampling steps saved in the config (a CSpD pair
            must use the same number).
        clip_denoised: sampling only (saved in the config, not used in training): the head's x0
            clamp (:class:`~mmspec.pipelines.mar.MARModel`); 5 ≈ the largest scaled token of the
            training images (their std is 1).
        mask_ratio_min: lower end of the truncated-normal mask ratio (MAR: 0.7).
        label_drop_prob: share of labels replaced by the null embedding (MAR: 0.1; CFG).
        diffusion_batch_mul: timesteps drawn per masked token and step (MAR: 4).
    """

    data: EmojiDataConfig = field(default_factory=EmojiDataConfig)
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    seed: int = 0
    weight_decay: float = 0.02
    ema_decay: float = 0.999
    embed_dim: int = 128
    depth: int = 2
    num_heads: int = 4
    buffer_size: int = 8
    diffloss_d: int = 3
    diffloss_w: int = 128
    num_sampling_steps: str = "50"
    clip_denoised: float | None = 5.0
    mask_ratio_min: float = 0.7
    label_drop_prob: float = 0.1
    diffusion_batch_mul: int = 4
    grad_clip: float = 1.0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 250
    resume: bool = False
    progress: bool = True

    @classmethod
    def draft(cls, **overrides: Any) -> MARTrainConfig:
        """The draft MAR: the same recipe at half the width, one block each side, a two-block head."""
        settings: dict[str, Any] = {
            "embed_dim": 64,
            "depth": 1,
            "num_heads": 4,
            "diffloss_d": 2,
            "diffloss_w": 64,
            "steps": 1500,
            "lr": 2e-3,
            "seed": 1,
        }
        settings.update(overrides)
        return cls(**settings)


# ---------------------------------------------------------------------------------------- VAE
def build_mar_vae(config: MARVAETrainConfig) -> MARAutoencoderKL:
    """A fresh :class:`MARAutoencoderKL` of the configured sizes (no level attention)."""
    return MARAutoencoderKL(
        embed_dim=config.embed_dim,
        ch=config.ch,
        ch_mult=tuple(config.ch_mult),
        num_res_blocks=config.num_res_blocks,
        attn_resolutions=(),
        resolution=config.data.image_size,
    )


def vae_training_loss(vae: MARAutoencoderKL, images: torch.Tensor, kl_weight: float, generator: torch.Generator):
    """``(total, reconstruction, kl)`` for ``images [B, 3, H, W]`` in [-1, 1]: L2 between the images
    and the decoded posterior sample, plus ``kl_weight`` times the mean KL(q(z|x) || N(0, I))."""
    mean, logvar = vae.encode(images)
    noise = torch.randn(mean.shape, generator=generator).to(mean.device)
    recon = vae.decode(mean + torch.exp(0.5 * logvar) * noise)
    rec = F.mse_loss(recon, images)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    return rec + kl_weight * kl, rec, kl


@torch.no_grad()
def encode_moments(vae: MARAutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """uint8 images ``[N, 3, H, W]`` -> posterior ``(mean, std)`` stacked ``[N, 2, C, h, w]`` (CPU)."""
    out = []
    for first in range(0, images.shape[0], batch_size):
        mean, logvar = vae.encode(to_model_range(images[first : first + batch_size].to(vae.device)))
        out.append(torch.stack([mean, torch.exp(0.5 * logvar)], 1).cpu())
    return torch.cat(out)


def train_mar_vae(config: MARVAETrainConfig, device: str | torch.device = "cpu") -> MARAutoencoderKL:
    """Train the KL autoencoder (see the module docstring) and set its ``scaling_factor`` to one
    over the std of the posterior means of (up to 2048) training images."""
    torch.manual_seed(config.seed)
    vae = build_mar_vae(config).to(device)
    generator = torch.Generator().manual_seed(config.seed)
    images, _ = render_images(config.data)
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(config.steps, config.warmup_steps))
    run = TrainRun("mar-vae", config, vae, optimizer, scheduler, generator)

    def step(index: int) -> dict[str, float]:
        rows = torch.randint(images.shape[0], (config.batch_size,), generator=generator)
        total, rec, kl = vae_training_loss(vae, to_model_range(images[rows].to(device)), config.kl_weight, generator)
        clip_and_step(run, total, config.grad_clip)
        return {"rec": rec.item(), "kl": kl.item()}

    run_training(run, step)
    means = encode_moments(vae, images[:2048])[:, 0]
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    return vae


# ---------------------------------------------------------------------------------------- MAR
def build_mar(config: MARTrainConfig, vae: MARAutoencoderKL) -> MARModel:
    """A fresh class-conditional :class:`MARModel` on ``vae``'s latents, initialised as the official
    ``MAR.initialize_weights`` and ``SimpleMLPAdaLN.initialize_weights``."""
    model = MARModel(
        img_size=config.data.image_size,
        vae_stride=vae.downsample_factor,
        patch_size=1,
        encoder_embed_dim=config.embed_dim,
        encoder_depth=config.depth,
        encoder_num_heads=config.num_heads,
        decoder_embed_dim=config.embed_dim,
        decoder_depth=config.depth,
        decoder_num_heads=config.num_heads,
        vae_embed_dim=vae.config.embed_dim,
        class_num=config.data.num_classes,
        buffer_size=config.buffer_size,
        diffloss_d=config.diffloss_d,
        diffloss_w=config.diffloss_w,
        num_sampling_steps=config.num_sampling_steps,
        clip_denoised=config.clip_denoised,
    )
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for p in (
        model.class_emb.weight,
        model.fake_latent,
        model.mask_token,
        model.encoder_pos_embed_learned,
        model.decoder_pos_embed_learned,
        model.diffusion_pos_embed_learned,
    ):
        nn.init.normal_(p, std=0.02)
    net = model.diffloss.net
    for layer in (net.time_embed.mlp[0], net.time_embed.mlp[2]):
        nn.init.normal_(layer.weight, std=0.02)
    for block in net.res_blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    for layer in (net.final_layer.adaLN_modulation[-1], net.final_layer.linear):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return model


class TrainingDiffusion:
    """The 1000-step cosine diffusion MAR's head is trained on, with guided-diffusion's hybrid loss
    for a learned-range variance (``training_losses`` with ``LossType.MSE``, ``learn_sigma=True``)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        sched = GaussianDiffusionSchedule("1000")
        self.num_timesteps = sched.num_steps

        def f32(values: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(values).float().to(device)

        self.sqrt_alphas_cumprod = f32(np.sqrt(sched.alphas_cumprod))
        self.sqrt_one_minus_alphas_cumprod = f32(np.sqrt(1.0 - sched.alphas_cumprod))
        self.sqrt_recip_alphas_cumprod = f32(sched.sqrt_recip_alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = f32(sched.sqrt_recipm1_alphas_cumprod)
        self.coef1 = f32(sched.posterior_mean_coef1)
        self.coef2 = f32(sched.posterior_mean_coef2)
        self.posterior_log_variance = f32(sched.posterior_log_variance_clipped)
        self.log_betas = f32(sched.log_betas)

    def loss(self, net: nn.Module, x0: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
        """Per-row loss ``[N]`` of ``x0 [N, C]`` at timesteps ``t [N]`` with condition ``cond [N, Z]``."""
        col = lambda a: a[t][:, None]  # noqa: E731  (per-row schedule value, [N, 1])
        x_t = col(self.sqrt_alphas_cumprod) * x0 + col(self.sqrt_one_minus_alphas_cumprod) * noise
        out = net(x_t, t, cond)
        channels = x0.shape[-1]
        eps, v = out[:, :channels], out[:, channels:]
        mse = (noise - eps).pow(2).mean(1)
        # Variational bound with the mean frozen: only the variance output v learns from it.
        pred_x0 = col(self.sqrt_recip_alphas_cumprod) * x_t - col(self.sqrt_recipm1_alphas_cumprod) * eps.detach()
        model_mean = col(self.coef1) * pred_x0 + col(self.coef2) * x_t
        frac = (v + 1) / 2
        model_log_var = frac * col(self.log_betas) + (1 - frac) * col(self.posterior_log_variance)
        true_mean = col(self.coef1) * x0 + col(self.coef2) * x_t
        true_log_var = col(self.posterior_log_variance)
        kl = 0.5 * (
            -1.0
            + model_log_var
            - true_log_var
            + torch.exp(true_log_var - model_log_var)
            + (true_mean - model_mean).pow(2) * torch.exp(-model_log_var)
        )
        kl = kl.mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).mean(1) / math.log(2.0)
        return mse + torch.where(t == 0, nll, kl)


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """guided-diffusion's decoder likelihood of ``x`` in bins of width 2/255 (edges at ±0.999 open)."""

    def cdf(v: torch.Tensor) -> torch.Tensor:
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v.pow(3))))

    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def mask_ratio(generator: torch.Generator, minimum: float) -> float:
    """One draw of MAR's mask ratio: N(1, 0.25²) truncated to [minimum, 1] (by rejection)."""
    while True:
        value = 1.0 + 0.25 * float(torch.randn((), generator=generator))
        if minimum <= value <= 1.0:
            return value


def mar_training_loss(
    model: MARModel,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    diffusion: TrainingDiffusion,
    config: MARTrainConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """MAR's loss for ``tokens [B, L, C]`` (scaled latents) of classes ``labels [B]``: the mean
    diffusion loss over masked tokens (every one repeated ``diffusion_batch_mul`` times)."""
    batch, seq_len, channels = tokens.shape
    device = tokens.device
    num_masked = math.ceil(seq_len * mask_ratio(generator, config.mask_ratio_min))
    orders = torch.argsort(torch.rand(batch, seq_len, generator=generator), dim=1)
    mask = torch.zeros(batch, seq_len).scatter_(1, orders[:, :num_masked], 1.0).bool().to(device)
    dropped = (torch.rand(batch, generator=generator) < config.label_drop_prob).to(device)
    emb = torch.where(dropped[:, None], model.fake_latent.expand(batch, -1), model.class_emb(labels))
    z = model.forward_mae_decoder(model.forward_mae_encoder(tokens, mask, emb), mask)  # [B, L, D]
    mul = config.diffusion_batch_mul
    x0 = tokens[mask].repeat(mul, 1)  # [M*mul, C] the masked tokens
    cond = z[mask].repeat(mul, 1)
    t = torch.randint(diffusion.num_timesteps, (x0.shape[0],), generator=generator).to(device)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    return diffusion.loss(model.diffloss.net, x0, cond, t, noise).mean()


def train_mar(
    vae: MARAutoencoderKL,
    config: MARTrainConfig,
    moments: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
) -> MARModel:
    """Train a class-conditional MAR on the emoji data encoded by ``vae``.

    Args:
        vae: the trained autoencoder (its ``scaling_factor`` scales the tokens).
        moments: the training images' posterior ``(mean, std)`` as :func:`encode_moments` returns
            for ``render_images(config.data)``; None encodes them here. Each step samples tokens
            from the posterior (as the official trainer does from cached moments).
        device: where the model trains; every random draw comes from a CPU generator.

    Returns:
        The EMA of the trained weights, as a :class:`MARModel` in eval mode on ``device``.
    """
    images, labels = render_images(config.data)
    if moments is None:
        moments = encode_moments(vae, images)
    if moments.shape[0] != labels.shape[0]:
        raise ValueError(f"moments has {moments.shape[0]} rows but the data {labels.shape[0]} images")
    torch.manual_seed(config.seed)
    model = build_mar(config, vae).to(device)
    ema = {name: p.detach().clone() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(config.steps, config.warmup_steps))
    run = TrainRun(f"mar {config.embed_dim}x{config.depth}", config, model, optimizer, scheduler, generator, extra=ema)
    diffusion = TrainingDiffusion(device)
    scale = vae.config.scaling_factor

    def step(index: int) -> dict[str, float]:
        rows = torch.randint(moments.shape[0], (config.batch_size,), generator=generator)
        mean, std = moments[rows, 0], moments[rows, 1]
        latents = (mean + std * torch.randn(mean.shape, generator=generator)) * scale
        tokens = model.patchify(latents).to(device)
        loss = mar_training_loss(model, tokens, labels[rows].to(device), diffusion, config, generator)
        clip_and_step(run, loss, config.grad_clip)
        decay = min(config.ema_decay, (1 + index) / (10 + index))
        with torch.no_grad():
            for name, p in model.named_parameters():
                ema[name].lerp_(p.detach(), 1.0 - decay)
        return {"loss": loss.item()}

    run_training(run, step)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(ema[name])
    return model


# ---------------------------------------------------------------------------------------- stages
#: ``mmspec train-reference`` stages of the MAR pair, in order (``--stage mar`` runs all three).
MAR_STAGES = ("mar-vae", "mar-target", "mar-draft")
#: The :class:`MARPipeline` component each MAR stage trains.
MAR_STAGE_COMPONENTS = {"mar-vae": "vae", "mar-target": "target", "mar-draft": "drafter"}


def mar_reference_configs(preset: str, seed: int = 0) -> dict[str, MARVAETrainConfig | MARTrainConfig]:
    """The configuration of each MAR stage (:data:`MAR_STAGES`): preset ``"reference"`` (the
    embedded ``mar-emoji`` pair; the LlamaGen reference's data) or ``"tiny"`` (seconds; tests)."""
    if preset == "reference":
        data = EmojiDataConfig(seed=seed)
        return {
            "mar-vae": MARVAETrainConfig(data=data, seed=seed),
            "mar-target": MARTrainConfig(data=data, seed=seed),
            "mar-draft": MARTrainConfig.draft(data=data, seed=seed + 1),
        }
    if preset == "tiny":
        data = EmojiDataConfig(image_size=16, num_classes=4, num_samples=64, heldout_samples=8, seed=seed)
        small = {
            "steps": 4,
            "batch_size": 8,
            "warmup_steps": 1,
            "checkpoint_every": 2,
            "buffer_size": 2,
            "num_sampling_steps": "10",
        }
        return {
            "mar-vae": MARVAETrainConfig(
                data=data, seed=seed, steps=4, batch_size=8, embed_dim=4, warmup_steps=1, checkpoint_every=2
            ),
            "mar-target": MARTrainConfig(
                data=data, seed=seed, embed_dim=32, depth=1, num_heads=2, diffloss_d=1, diffloss_w=32, **small
            ),
            "mar-draft": MARTrainConfig.draft(
                data=data, seed=seed + 1, embed_dim=16, num_heads=2, diffloss_d=1, diffloss_w=16, **small
            ),
        }
    raise ValueError(f"unknown preset {preset!r}: 'reference' or 'tiny'")


def save_mar_pipeline(
    vae: MARAutoencoderKL,
    target: MARModel,
    drafter: MARModel,
    data: EmojiDataConfig,
    out: str | Path,
    recipe: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float16,
) -> MARPipeline:
    """Assemble a :class:`MARPipeline` and ``save_pretrained`` it to ``out`` with the class list and
    the recipe; weights stored as ``dtype``. The returned pipeline is float32 and holds the weights
    as stored (rounded through ``dtype``), so evaluating it measures the saved model."""
    pipe = MARPipeline(target=target, vae=vae, drafter=drafter)
    out = Path(out)
    for model in (vae, target, drafter):
        torch.nn.Module.to(model, dtype)  # torch's, not ModelMixin's (which warns about fp32 modules)
    try:
        pipe.save_pretrained(out)
    finally:
        for model in (vae, target, drafter):
            torch.nn.Module.to(model, torch.float32)
    glyphs = data.dataset(heldout=True).glyphs
    classes = [{"label": i, "char": g.char, "name": g.name} for i, g in enumerate(glyphs)]
    (out / CLASSES_FILE).write_text(json.dumps(classes, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if recipe is not None:
        (out / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    return pipe


@torch.no_grad()
def heldout_mar_loss(
    model: MARModel, moments: torch.Tensor, labels: torch.Tensor, scale: float, seed: int = 0
) -> float:
    """MAR's training loss on held-out latents (posterior means), all draws from ``seed``: the
    same masks, timesteps and noises for every model, so models compare on one draw."""
    generator = torch.Generator().manual_seed(seed)
    config = MARTrainConfig(label_drop_prob=0.0)
    tokens = model.patchify(moments[:, 0] * scale)
    return float(mar_training_loss(model, tokens, labels, TrainingDiffusion(), config, generator))


@torch.no_grad()
def evaluate_mar_reference(pipe: MARPipeline, data: EmojiDataConfig, num_images: int = 8, seed: int = 0) -> dict:
    """What the training command reports for a MAR pair: VAE PSNR on held-out scenes, held-out
    MAR loss of target and draft, and baseline vs CSpD on ``num_images`` classes (batch 1,
    ``num_iter`` 16, cfg 3, γ = 4): target forwards, acceptance rate, seconds per image.
    FID is measured by ``mmspec bench --suite mar`` (see the model card)."""
    images, labels = render_images(data, heldout=True)
    pixels = images.float() / 255.0
    moments = encode_moments(pipe.vae, images)
    recon = ((pipe.vae.decode(moments[:, 0]) + 1) / 2).clamp(0, 1)
    mse = (recon - pixels).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    scale = pipe.vae.config.scaling_factor
    result: dict[str, Any] = {
        "heldout_images": int(images.shape[0]),
        "vae_psnr_db": float((10 * torch.log10(1 / mse)).mean()),
        "scaling_factor": scale,
        "target_heldout_loss": heldout_mar_loss(pipe.target, moments, labels, scale),
        "drafter_heldout_loss": heldout_mar_loss(pipe.drafter, moments, labels, scale),
    }
    pipe.set_progress_bar_config(disable=True)
    generation = {}
    for name, method in (("baseline", None), ("cspd", "cspd")):
        forwards, accepted, seconds = [], [], []
        for i in range(num_images):
            start = time.perf_counter()
            out = pipe(
                class_labels=[i % data.num_classes],
                num_iter=16,
                guidance_scale=3.0,
                speculative=method,
                num_draft_tokens=4,
                generator=torch.Generator().manual_seed(seed + i),
                output_type="pt",
            )
            seconds.append(time.perf_counter() - start)
            forwards.append(out.stats.steps)
            if method:
                accepted.append(out.stats.draft_acceptance_rate)
        generation[name] = {
            "target_forwards": float(np.mean(forwards)),
            "acceptance_rate": float(np.mean(accepted)) if accepted else None,
            "seconds_per_image": float(np.mean(seconds)),
        }
    result["generation"] = generation
    return result


def assemble_mar_pipeline(
    out: Path, configs: dict, preset: str, seed: int, dtype: torch.dtype, evaluate: bool = True
) -> MARPipeline:
    """``OUT/mar-vae``, ``OUT/mar-target``, ``OUT/mar-draft`` -> ``OUT/mar-pipeline`` (weights in
    ``dtype``, with ``classes.json`` and the recipe of ``configs``) and, with ``evaluate``,
    ``OUT/mar-eval.json`` (:func:`evaluate_mar_reference`)."""
    parts = {
        "vae": MARAutoencoderKL.from_pretrained(out / "mar-vae").eval(),
        "target": MARModel.from_pretrained(out / "mar-target").eval(),
        "drafter": MARModel.from_pretrained(out / "mar-draft").eval(),
    }
    recipe = {"preset": preset, "seed": seed, **{k: dataclasses.asdict(c) for k, c in configs.items()}}
    for config in recipe.values():
        if isinstance(config, dict):
            for key in RUN_CONTROL_FIELDS:
                config.pop(key)
    data = configs["mar-vae"].data
    pipe = save_mar_pipeline(**parts, data=data, out=out / "mar-pipeline", recipe=recipe, dtype=dtype)
    print(f"pipeline -> {out / 'mar-pipeline'}")
    if evaluate:
        metrics = evaluate_mar_reference(pipe, data)
        (out / "mar-eval.json").write_text(json.dumps(metrics, indent=1) + "\n")
        print(json.dumps(metrics, indent=1))
    return pipe


def train_mar_reference_stages(args: argparse.Namespace) -> int:
    """``mmspec train-reference --stage mar-vae|mar-target|mar-draft|mar``: train the stage(s),
    save each to ``OUT/<stage>``; once all three exist, assemble ``OUT/mar-pipeline`` (weights in
    ``--save-dtype``, :func:`save_mar_pipeline`) and evaluate it into ``OUT/mar-eval.json``
    (:func:`evaluate_mar_reference`). Returns 0."""
    out = Path(args.out)
    common = {"resume": args.resume, "progress": not args.no_progress}
    if args.checkpoint_every is not None:
        common["checkpoint_every"] = args.checkpoint_every
    configs = {}
    for stage, config in mar_reference_configs(args.preset, args.seed).items():
        override = getattr(args, stage.replace("-", "_") + "_steps", None)
        steps = {"steps": override} if override is not None else {}
        configs[stage] = dataclasses.replace(config, checkpoint_dir=str(out / "checkpoints" / stage), **common, **steps)
    stages = MAR_STAGES if args.stage == "mar" else (args.stage,)
    timings: dict[str, float] = {}
    vae, moments = None, None
    for stage in stages:
        start = time.perf_counter()
        if stage == "mar-vae":
            vae = train_mar_vae(configs[stage], args.device)
            vae.save_pretrained(out / stage)
        else:
            if vae is None:
                if not (out / "mar-vae").is_dir():
                    raise SystemExit(
                        f"error: stage {stage!r} needs a trained VAE in {out / 'mar-vae'}: run --stage mar-vae first"
                    )
                vae = MARAutoencoderKL.from_pretrained(out / "mar-vae").to(args.device).eval()
            if moments is None:
                moments = encode_moments(vae, render_images(configs[stage].data)[0])
            train_mar(vae, configs[stage], moments, args.device).save_pretrained(out / stage)
        timings[stage] = time.perf_counter() - start
        print(f"{stage}: {timings[stage]:.1f} s -> {out / stage}")
    timings_file = out / "mar-timings.json"  # stages run one at a time add to it
    previous = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    timings_file.write_text(json.dumps({**previous, **timings}, indent=1) + "\n")
    missing = [stage for stage in MAR_STAGES if not (out / stage).is_dir()]
    if missing:
        print(f"{out / 'mar-pipeline'} not assembled: stage(s) {', '.join(missing)} not trained yet")
        return 0
    assemble_mar_pipeline(out, configs, args.preset, args.seed, getattr(torch, args.save_dtype), not args.no_eval)
    return 0
