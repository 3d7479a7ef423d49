"""Stage 1 of the reference recipe (:mod:`mmspec.training.reference`): the LlamaGen VQ tokenizer,
trained with the VQ-VAE objective and dead-code restarts."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..pipelines.llamagen import LlamaGenVQ
from .loop import TrainRun, clip_and_step, cosine_schedule, run_training
from .reference_data import EmojiDataConfig, render_images, to_model_range


# ---------------------------------------------------------------------------------------- configs
@dataclass
class VQTrainConfig:
    """Settings of :func:`train_vq` (model sizes, optimisation, checkpoints).

    Args:
        data: the emoji data.
        steps: optimiser steps in total (a resumed run continues up to it).
        batch_size: images per step.
        lr: peak Adam learning rate (linear warm-up over ``warmup_steps``, cosine decay to 10 %).
        seed: seeds the initialisation and every random choice of the run.
        codebook_size, codebook_embed_dim, ch, ch_mult, z_channels, num_res_blocks: the
            :class:`LlamaGenVQ` sizes (downsampling ``2**(len(ch_mult)-1)``; GroupNorm needs widths
            that are multiples of 32).
        commitment_beta: β of the commitment loss (VQ-VAE; LlamaGen: 0.25).
        reconstruction_loss: ``"l2"`` (LlamaGen's default) or ``"l1"``.
        restart_every: every N steps, codes unused since the last restart are re-initialised from
            random encoder outputs (0 = never).
        grad_clip: gradient-norm clip.
        checkpoint_dir: where checkpoints go (None = none). checkpoint_every: save every N steps
            and at the end. resume: continue from the latest checkpoint in ``checkpoint_dir``.
        progress: show a tqdm bar.
    """

    data: EmojiDataConfig = field(default_factory=EmojiDataConfig)
    steps: int = 800
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 50
    seed: int = 0
    codebook_size: int = 512
    codebook_embed_dim: int = 8
    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)
    z_channels: int = 64
    num_res_blocks: int = 1
    commitment_beta: float = 0.25
    reconstruction_loss: str = "l2"
    restart_every: int = 200
    grad_clip: float = 1.0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 250
    resume: bool = False
    progress: bool = True


# ---------------------------------------------------------------------------------------- VQ
@dataclass
class VQLosses:
    """Terms of the VQ-VAE objective for one batch (see :func:`vq_training_losses`)."""

    total: torch.Tensor
    reconstruction: torch.Tensor
    codebook: torch.Tensor
    commitment: torch.Tensor
    latents: torch.Tensor  # [B*h*w, C] L2-normalised encoder outputs (detached), for code restarts
    indices: torch.Tensor  # [B*h*w] chosen codes


def vq_training_losses(
    vq: LlamaGenVQ, images: torch.Tensor, commitment_beta: float = 0.25, reconstruction_loss: str = "l2"
) -> VQLosses:
    """The VQ-VAE objective (van den Oord et al. 2017) as LlamaGen trains its tokenizer, without
    the perceptual and GAN terms.

    With ``z`` the (L2-normalised, LlamaGen's cosine codebook) encoder output and ``e`` its nearest
    (normalised) code: ``rec(decode(z + sg[e - z]), x) + ||sg[z] - e||² + β ||z - sg[e]||²``. The
    straight-through estimator passes the decoder's gradient to the encoder unchanged; the codebook
    loss moves codes towards the encoder outputs, the commitment loss keeps the encoder close to
    its codes.

    Args:
        vq: the tokenizer (its quantiser's nearest-code search is reused as is).
        images: ``[B, 3, H, W]`` in ``[-1, 1]``.
        commitment_beta: β (LlamaGen: 0.25).
        reconstruction_loss: ``"l2"`` (mean squared error, LlamaGen's default) or ``"l1"``.
    """
    if reconstruction_loss not in ("l1", "l2"):
        raise ValueError(f"reconstruction_loss must be 'l1' or 'l2', got {reconstruction_loss!r}")
    z = vq.quant_conv(vq.encoder(images))  # [B, C, h, w]
    batch, channels, height, width = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, channels)
    if vq.quantize.l2_norm:
        flat = F.normalize(flat, p=2, dim=-1)
    with torch.no_grad():
        _, indices = vq.quantize(z)
    indices = indices.flatten()
    codes = vq.quantize.codebook()[indices]  # differentiable w.r.t. the codebook
    codebook_loss = F.mse_loss(codes, flat.detach())
    commitment_loss = commitment_beta * F.mse_loss(flat, codes.detach())
    quant = flat + (codes - flat).detach()  # straight-through
    quant = quant.view(batch, height, width, channels).permute(0, 3, 1, 2)
    recon = vq.decode(quant)
    rec_loss = F.mse_loss(recon, images) if reconstruction_loss == "l2" else F.l1_loss(recon, images)
    total = rec_loss + codebook_loss + commitment_loss
    return VQLosses(total, rec_loss, codebook_loss, commitment_loss, flat.detach(), indices)


def build_vq(config: VQTrainConfig) -> LlamaGenVQ:
    """A fresh :class:`LlamaGenVQ` of the configured sizes (cosine codebook, no usage buffer)."""
    return LlamaGenVQ(
        codebook_size=config.codebook_size,
        codebook_embed_dim=config.codebook_embed_dim,
        codebook_l2_norm=True,
        # The official usage window is a 256 KB training buffer this recipe does not use.
        codebook_show_usage=False,
        encoder_ch_mult=tuple(config.ch_mult),
        decoder_ch_mult=tuple(config.ch_mult),
        z_channels=config.z_channels,
        ch=config.ch,
        num_res_blocks=config.num_res_blocks,
    )


@torch.no_grad()
def _restart_codes(run: TrainRun, latents: torch.Tensor, dead: torch.Tensor) -> None:
    """Re-initialise the ``dead`` codes from random encoder outputs and clear their Adam moments
    (stale moments would push the fresh codes straight back)."""
    weight = run.model.quantize.embedding.weight
    rows = dead.nonzero().flatten()
    if rows.numel() == 0:
        return
    picks = torch.randint(latents.shape[0], (rows.numel(),), generator=run.generator)  # CPU stream
    weight[rows] = latents[picks.to(latents.device)]
    for moment in ("exp_avg", "exp_avg_sq"):
        state = run.optimizer.state.get(weight, {})
        if moment in state:
            state[moment][rows] = 0.0


def train_vq(config: VQTrainConfig, device: str | torch.device = "cpu") -> LlamaGenVQ:
    """Train a LlamaGen VQ tokenizer on the emoji data (see the module docstring for the recipe).

    Args:
        device: where the model trains (``"cuda"`` on a GPU machine). The data stay on the CPU and
            every random draw comes from CPU generators, so a run sees the same batches on any device.

    Returns:
        The trained tokenizer, in eval mode, on ``device``.
    """
    torch.manual_seed(config.seed)
    vq = build_vq(config).to(device)
    generator = torch.Generator().manual_seed(config.seed)
    images, _ = render_images(config.data)
    optimizer = torch.optim.Adam(vq.parameters(), lr=config.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(config.steps, config.warmup_steps))
    usage = torch.zeros(config.codebook_size, dtype=torch.long, device=device)
    run = TrainRun("vq", config, vq, optimizer, scheduler, generator, extra={"usage": usage})

    def step(index: int) -> dict[str, float]:
        rows = torch.randint(images.shape[0], (config.batch_size,), generator=generator)
        batch = to_model_range(images[rows].to(device))
        losses = vq_training_losses(vq, batch, config.commitment_beta, config.reconstruction_loss)
        if index == 0:
            # Data-dependent start: the tiny uniform init would leave most codes unreachable.
            _restart_codes(run, losses.latents, torch.ones_like(usage, dtype=torch.bool))
            losses = vq_training_losses(vq, batch, config.commitment_beta, config.reconstruction_loss)
        usage.add_(torch.bincount(losses.indices, minlength=config.codebook_size))
        clip_and_step(run, losses.total, config.grad_clip)
        metrics = {"rec": losses.reconstruction.item(), "commit": losses.commitment.item()}
        if config.restart_every and (index + 1) % config.restart_every == 0:
            metrics["used"] = float((usage > 0).sum())
            _restart_codes(run, losses.latents, usage == 0)
            usage.zero_()
        return metrics

    run_training(run, step)
    return vq
