"""Recipes for mmspec's small reference models: a LlamaGen VQ tokenizer, a class-conditional
LlamaGen GPT (the target) and a smaller GPT (the drafter), trained on the offline emoji dataset
(:mod:`mmspec.data`) so that the embedded default model runs out of the box on a CPU.

Stages (``mmspec train-reference --stage vq|gpt|draft|low-res-draft|upsampler|all --out DIR``):

1. :func:`train_vq` — LlamaGen's VQ architecture (Sun et al. 2024, arXiv 2406.06525) trained with
   the VQ-VAE objective (van den Oord et al. 2017, arXiv 1711.00937): pixel reconstruction loss,
   codebook loss ``||sg[z] - e||²``, commitment loss ``β ||z - sg[e]||²`` (β = 0.25) and the
   straight-through gradient, on LlamaGen's L2-normalised (cosine) codebook. Codes that went unused
   since the last check are re-initialised from random encoder outputs (the dead-code restart of
   Dhariwal et al. 2020, Jukebox, and Zeghidour et al. 2021, SoundStream), and the whole codebook
   starts from encoder outputs. LlamaGen's perceptual (LPIPS) and GAN losses are left out: their
   pretrained networks are not available offline.
2. :func:`train_c2i_gpt` — the images are tokenised once with the trained VQ; the GPT is trained
   with teacher-forced next-token cross-entropy and LlamaGen's class dropout (the dropped label is
   the null class, which classifier-free guidance uses at sampling time), AdamW, linear warm-up
   then cosine decay, gradient clipping. The drafter is the same recipe with a smaller
   :meth:`GPTTrainConfig.draft` configuration.
3. The low-resolution drafter of MuLo-SD (:meth:`GPTTrainConfig.low_res_draft`): the drafter's
   recipe on the same scenes rendered at half the side, tokenised by the same VQ, so it drafts a
   grid of half the side in the target's codebook (``speculative="mulo"`` up-samples it).
4. MuLo-SD's learned up-sampler (:func:`train_upsampler`): a
   :class:`~mmspec.pipelines.llamagen.LlamaGenTokenUpsampler` trained with cross-entropy to predict
   each scene's tokens at the full resolution from the same scene's tokens at half the side.

Every stage shows a tqdm bar, writes checkpoints (model, optimiser, scheduler, step, RNG states)
every ``checkpoint_every`` steps and at the end, and continues from the latest one with
``resume=True``; with the same seed on the same device a run is bit-for-bit reproducible, resumed
or not. :func:`evaluate_reference` measures what the model card reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.emoji import AugmentConfig, EmojiDataset
from ..pipelines.llamagen import LlamaGenCondition, LlamaGenGPT, LlamaGenTokenUpsampler, LlamaGenVQ
from ..pipelines.llamagen.mulo import DecodeResizeEncode
from ..pipelines.llamagen.pipeline_llamagen import LlamaGenPipeline
from .loop import TrainRun, clip_and_step, cosine_schedule, param_groups, run_training
from .saved import CLASSES_FILE

# Held-out items come from another dataset seed, so they are never among the training scenes.
HELDOUT_SEED_OFFSET = 1_000_003
#: File next to a saved pipeline recording the recipe (data and training configurations).
RECIPE_FILE = "recipe.json"
STAGES = ("vq", "gpt", "draft", "low-res-draft", "upsampler")
#: The :class:`LlamaGenPipeline` component each GPT stage trains.
STAGE_COMPONENTS = {"gpt": "target", "draft": "drafter", "low-res-draft": "low_res_drafter"}


# ---------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class EmojiDataConfig:
    """The emoji data every stage trains on (one config, so VQ and GPT see the same scenes).

    Args:
        image_size: image side in pixels; the token grid is ``image_size / vq downsampling``.
        num_classes: the first ``num_classes`` visually distinct glyphs
            (:func:`~mmspec.data.emoji.select_distinct_glyphs`) are the classes.
        num_samples: training scenes, rendered once per process and reused every epoch.
        heldout_samples: held-out scenes for evaluation (another dataset seed).
        seed: dataset seed (scene ``i`` depends only on it and ``i``).
        position_jitter, scale_range, rotation_degrees, backgrounds: the
            :class:`~mmspec.data.emoji.AugmentConfig` fields; modest so that 32-pixel classes stay
            learnable by a small GPT.
    """

    image_size: int = 32
    num_classes: int = 32
    num_samples: int = 16384
    heldout_samples: int = 256
    seed: int = 0
    position_jitter: float = 0.04
    scale_range: tuple[float, float] = (0.75, 0.9)
    rotation_degrees: float = 8.0
    backgrounds: tuple[str, ...] = ("white", "solid")

    def dataset(self, heldout: bool = False) -> EmojiDataset:
        """The training (or held-out) :class:`~mmspec.data.emoji.EmojiDataset`."""
        augment = AugmentConfig(
            position_jitter=self.position_jitter,
            scale_range=tuple(self.scale_range),
            rotation_degrees=self.rotation_degrees,
            backgrounds=tuple(self.backgrounds),
        )
        return EmojiDataset(
            image_size=self.image_size,
            num_samples=self.heldout_samples if heldout else self.num_samples,
            seed=self.seed + HELDOUT_SEED_OFFSET if heldout else self.seed,
            classes=self.num_classes,
            augment=augment,
            return_pil=True,
        )


@functools.lru_cache(maxsize=4)
def render_images(data: EmojiDataConfig, heldout: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Render the whole training (or held-out) set once, cached for the process.

    Rendering is the slowest part of a data step on a CPU, so scenes are drawn once and sampled
    from memory (as uint8, a quarter of the float size).

    Returns:
        ``(images uint8 [N, 3, H, W], labels int64 [N])``.
    """
    dataset = data.dataset(heldout)
    images = np.empty((len(dataset), 3, data.image_size, data.image_size), dtype=np.uint8)
    labels = torch.empty(len(dataset), dtype=torch.long)
    for i in tqdm(range(len(dataset)), desc="render emoji", leave=False, disable=len(dataset) < 2048):
        item = dataset[i]
        images[i] = np.asarray(item["image"]).transpose(2, 0, 1)
        labels[i] = item["label"]
    return torch.from_numpy(images), labels


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[0, 255]`` images -> float ``[-1, 1]`` (the VQ's input range)."""
    return images.float() / 127.5 - 1.0


@torch.no_grad()
def tokenize_images(vq: LlamaGenVQ, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Encode uint8 images ``[N, 3, H, W]`` (on any device) to token ids ``[N, h*w]`` (raster
    order, on the CPU), in batches on ``vq``'s device."""
    out = []
    for first in range(0, images.shape[0], batch_size):
        _, indices = vq.encode(to_model_range(images[first : first + batch_size].to(vq.device)))
        out.append(indices.flatten(1).cpu())
    return torch.cat(out)


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


@dataclass
class GPTTrainConfig:
    """Settings of :func:`train_c2i_gpt` (model sizes, optimisation, checkpoints).

    Args:
        data: the emoji data (must be the VQ's).
        steps, batch_size, lr, warmup_steps, seed: as in :class:`VQTrainConfig` (AdamW here).
        weight_decay: AdamW decay of matrices and embeddings (LlamaGen: 0.05 on ≥ 2-D parameters).
        dim, n_layer, n_head: :class:`LlamaGenGPT` sizes (``dim / n_head`` divisible by 4).
        class_dropout_prob: share of labels replaced by the null class (LlamaGen: 0.1), which
            trains the unconditional branch of classifier-free guidance.
        grad_clip, checkpoint_dir, checkpoint_every, resume, progress: as in :class:`VQTrainConfig`.
    """

    data: EmojiDataConfig = field(default_factory=EmojiDataConfig)
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    seed: int = 0
    weight_decay: float = 0.05
    dim: int = 192
    n_layer: int = 4
    n_head: int = 6
    class_dropout_prob: float = 0.1
    grad_clip: float = 1.0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 250
    resume: bool = False
    progress: bool = True

    @classmethod
    def draft(cls, **overrides: Any) -> GPTTrainConfig:
        """The drafter's configuration: the same recipe with a much smaller network."""
        settings: dict[str, Any] = {"dim": 96, "n_layer": 2, "n_head": 4, "steps": 600, "lr": 2e-3, "seed": 1}
        settings.update(overrides)
        return cls(**settings)

    @classmethod
    def low_res_draft(cls, data: EmojiDataConfig, **overrides: Any) -> GPTTrainConfig:
        """MuLo-SD's low-resolution drafter: the drafter's recipe on ``data`` rendered at half the
        side (the same scenes and augmentation), so its grid has half the target's side."""
        if data.image_size % 2:
            raise ValueError(f"the low-resolution drafter halves the image side, so it must be even, got {data.image_size}")
        settings: dict[str, Any] = {"seed": data.seed + 2}
        settings.update(overrides)
        return cls.draft(data=dataclasses.replace(data, image_size=data.image_size // 2), **settings)


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


# ---------------------------------------------------------------------------------------- GPT
def build_gpt(config: GPTTrainConfig, vocab_size: int, block_size: int) -> LlamaGenGPT:
    """A fresh class-conditional :class:`LlamaGenGPT` of the configured sizes."""
    return LlamaGenGPT(
        dim=config.dim,
        n_layer=config.n_layer,
        n_head=config.n_head,
        # SwiGLU width rounded to 32 rather than the official 256: these models are tiny.
        multiple_of=32,
        num_classes=config.data.num_classes,
        class_dropout_prob=config.class_dropout_prob,
        model_type="c2i",
        vocab_size=vocab_size,
        block_size=block_size,
    )


def gpt_training_loss(gpt: LlamaGenGPT, class_labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean teacher-forced next-token cross-entropy over all image tokens (LlamaGen's objective).

    Args:
        class_labels: ``[B]`` labels (the null class ``num_classes`` for dropped labels).
        tokens: ``[B, N]`` image tokens in raster order.
    """
    logits = gpt.teacher_forced_logits(LlamaGenCondition(class_labels=class_labels), tokens)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))


def train_c2i_gpt(vq: LlamaGenVQ, config: GPTTrainConfig, tokens: torch.Tensor | None = None,
                  device: str | torch.device = "cpu") -> LlamaGenGPT:
    """Train a class-conditional LlamaGen GPT on the emoji data tokenised by ``vq``.

    Args:
        vq: the trained tokenizer (vocabulary = its codebook).
        config: sizes and optimisation (:meth:`GPTTrainConfig.draft` for the drafter).
        tokens: the training images already tokenised by ``vq`` (``[N, h*w]``, as
            :func:`tokenize_images` returns for ``render_images(config.data)``); None tokenises
            them here. Passing them lets the target and drafter stages share one tokenisation.
        device: where the model trains; batches are drawn on the CPU (as in :func:`train_vq`).

    Returns:
        The trained GPT, in eval mode, on ``device``.
    """
    images, labels = render_images(config.data)
    if tokens is None:
        tokens = tokenize_images(vq, images)
    if tokens.shape[0] != labels.shape[0]:
        raise ValueError(f"tokens has {tokens.shape[0]} rows but the data {labels.shape[0]} images")
    torch.manual_seed(config.seed)
    gpt = build_gpt(config, vq.config.codebook_size, tokens.shape[1]).to(device)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(param_groups(gpt, config.weight_decay), lr=config.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(config.steps, config.warmup_steps))
    run = TrainRun(f"gpt {config.dim}x{config.n_layer}", config, gpt, optimizer, scheduler, generator)
    null_class = config.data.num_classes

    def step(index: int) -> dict[str, float]:
        rows = torch.randint(tokens.shape[0], (config.batch_size,), generator=generator)
        dropped = torch.rand(config.batch_size, generator=generator) < config.class_dropout_prob
        batch_labels = torch.where(dropped, null_class, labels[rows])
        loss = gpt_training_loss(gpt, batch_labels.to(device), tokens[rows].to(device))
        clip_and_step(run, loss, config.grad_clip)
        return {"ce": loss.item()}

    run_training(run, step)
    return gpt


# ---------------------------------------------------------------------------------------- up-sampler
@dataclass
class UpsamplerTrainConfig:
    """Settings of :func:`train_upsampler` (MuLo-SD's learned up-sampler).

    Args:
        data: the full-resolution emoji data (the target's); the input grids are the same scenes
            rendered at ``image_size / scale`` (the low-resolution drafter's data).
        scale: side ratio between the two grids.
        dim, num_blocks: :class:`~mmspec.pipelines.llamagen.LlamaGenTokenUpsampler` sizes.
        steps, batch_size, lr, warmup_steps, seed, weight_decay, grad_clip, checkpoint_dir,
            checkpoint_every, resume, progress: as in :class:`GPTTrainConfig`.
    """

    data: EmojiDataConfig = field(default_factory=EmojiDataConfig)
    scale: int = 2
    dim: int = 96
    num_blocks: int = 1
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 50
    seed: int = 3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 250
    resume: bool = False
    progress: bool = True

    @property
    def low_data(self) -> EmojiDataConfig:
        """The input grids' data: the same scenes at ``1 / scale`` of the side."""
        if self.data.image_size % self.scale:
            raise ValueError(f"image_size {self.data.image_size} is not divisible by the up-sampler's scale {self.scale}")
        return dataclasses.replace(self.data, image_size=self.data.image_size // self.scale)


def cached_tokens(vq: LlamaGenVQ, data: EmojiDataConfig, cache: dict[EmojiDataConfig, torch.Tensor],
                  heldout: bool = False) -> torch.Tensor:
    """``data``'s training (or held-out) scenes tokenised by ``vq`` (``[N, h*w]``), once per
    rendering: ``cache`` (one per split) keeps each tokenisation for the stages that share it."""
    if data not in cache:
        cache[data] = tokenize_images(vq, render_images(data, heldout)[0])
    return cache[data]


def upsampler_pairs(vq: LlamaGenVQ, config: UpsamplerTrainConfig, heldout: bool = False,
                    tokens: dict[EmojiDataConfig, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low [N, h, w], high [N, h * scale, w * scale])`` token grids of the same scenes, tokenised
    by ``vq``. ``tokens``: a :func:`cached_tokens` cache of the same split (None: a fresh one)."""
    cache = {} if tokens is None else tokens
    grids = []
    for data in (config.low_data, config.data):
        flat = cached_tokens(vq, data, cache, heldout)
        side = math.isqrt(flat.shape[1])
        grids.append(flat.view(-1, side, side))
    return grids[0], grids[1]


def train_upsampler(vq: LlamaGenVQ, config: UpsamplerTrainConfig, low: torch.Tensor | None = None,
                    high: torch.Tensor | None = None, device: str | torch.device = "cpu") -> LlamaGenTokenUpsampler:
    """Train MuLo-SD's learned up-sampler: per-position cross-entropy of the full-resolution
    tokens ``high [N, H, W]`` given the same scenes' low-resolution tokens ``low [N, H/s, W/s]``
    (None: tokenised here by :func:`upsampler_pairs`). AdamW, warm-up + cosine, gradient clipping,
    checkpoints and resume as every recipe stage. Returns the model in eval mode on ``device``."""
    if low is None or high is None:
        low, high = upsampler_pairs(vq, config)
    if low.shape[0] != high.shape[0] or tuple(high.shape[1:]) != (low.shape[1] * config.scale, low.shape[2] * config.scale):
        raise ValueError(f"low {tuple(low.shape)} and high {tuple(high.shape)} grids are not pairs at scale {config.scale}")
    torch.manual_seed(config.seed)
    model = LlamaGenTokenUpsampler(vq.config.codebook_size, config.scale, config.dim, config.num_blocks).to(device)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(config.steps, config.warmup_steps))
    run = TrainRun(f"upsampler x{config.scale}", config, model, optimizer, scheduler, generator)

    def step(index: int) -> dict[str, float]:
        rows = torch.randint(low.shape[0], (config.batch_size,), generator=generator)
        loss = F.cross_entropy(model(low[rows].to(device)), high[rows].to(device))
        clip_and_step(run, loss, config.grad_clip)
        return {"ce": loss.item()}

    run_training(run, step)
    return model.eval()


@torch.no_grad()
def upsampler_accuracy(upsample: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor], low: torch.Tensor,
                       high: torch.Tensor, batch_size: int = 256) -> float:
    """Share of positions where ``upsample(low)`` gives the token the full-resolution rendering of
    the same scene has (``low [N, h, w]``, ``high [N, H, W]``)."""
    hits = 0
    for first in range(0, low.shape[0], batch_size):
        rows = slice(first, first + batch_size)
        hits += int((upsample(low[rows], tuple(high.shape[1:])).cpu() == high[rows]).sum())
    return hits / high.numel()


# ---------------------------------------------------------------------------------------- evaluation
def _psnr(reference: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of ``[B, 3, H, W]`` images in ``[0, 1]``."""
    mse = (reference - estimate).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10.0 * torch.log10(1.0 / mse)


@torch.no_grad()
def heldout_cross_entropy(gpt: LlamaGenGPT, labels: torch.Tensor, tokens: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy (nats) of ``gpt`` on ``tokens [N, h*w]`` with true labels."""
    total = 0.0
    for first in range(0, tokens.shape[0], batch_size):
        rows = slice(first, first + batch_size)
        total += float(gpt_training_loss(gpt, labels[rows], tokens[rows])) * tokens[rows].shape[0]
    return total / tokens.shape[0]


@torch.no_grad()
def evaluate_reference(
    pipe: LlamaGenPipeline,
    data: EmojiDataConfig | None = None,
    class_labels: list[int] | None = None,
    seed: int = 0,
    guidance_scale: float = 3.0,
    sjd_draft_tokens: int = 8,
    model_draft_tokens: int = 4,
) -> dict[str, Any]:
    """Measure a reference pipeline: tokenizer, target (and drafter) likelihood, speculative stats.

    Args:
        pipe: a :class:`LlamaGenPipeline` with ``target``, ``vq`` and (optionally) ``drafter`` /
            ``low_res_drafter`` / ``upsampler``.
        data: the data it was trained on (None: :class:`EmojiDataConfig` defaults, the embedded
            model's); its held-out scenes are used.
        class_labels: classes generated for the speculative statistics, one image each
            (None: the first 8 classes).
        seed: image ``i`` is generated with ``torch.Generator().manual_seed(seed + i)``.
        guidance_scale: classifier-free guidance of those generations (temperature 1, no top-k:
            exact sampling from the guided distribution).
        sjd_draft_tokens, model_draft_tokens: ``num_draft_tokens`` for SJD and the draft model.

    Returns:
        A JSON-ready dict: ``vq_psnr_db`` (mean per-image PSNR of reconstructions of held-out
        scenes, pixels in [0, 1]), ``vq_codes_used`` (distinct codes in those scenes),
        ``target_heldout_ce`` / ``target_heldout_ppl`` (next-token cross-entropy in nats and
        perplexity on the held-out scenes' tokens), ``drafter_heldout_ppl``,
        ``low_res_drafter_heldout_ppl`` (on the held-out scenes rendered at its resolution),
        ``upsampler_heldout_accuracy`` / ``decode_resize_encode_heldout_accuracy`` (share of
        held-out full-resolution tokens the learned / training-free up-sampler recovers from the
        same scenes' low-resolution tokens), ``uniform_ppl``
        (the codebook size) and ``generation``: per method (``"baseline"``, ``"sjd"``,
        ``"draft-model"``) the mean decode ``steps`` per image, ``mean_accepted`` (drafts kept per
        step, without the recovered/bonus token) and ``seconds_per_image``.
    """
    data = data or EmojiDataConfig()
    images, labels = render_images(data, heldout=True)
    pixels = images.float() / 255.0
    quant, _ = pipe.vq.encode(pixels * 2.0 - 1.0)
    recon = ((pipe.vq.decode(quant) + 1.0) / 2.0).clamp(0.0, 1.0)
    heldout_tokens: dict[EmojiDataConfig, torch.Tensor] = {}  # one tokenisation per resolution
    tokens = cached_tokens(pipe.vq, data, heldout_tokens, heldout=True)
    target_ce = heldout_cross_entropy(pipe.target, labels, tokens)
    result: dict[str, Any] = {
        "heldout_images": int(images.shape[0]),
        "vq_psnr_db": float(_psnr(pixels, recon).mean()),
        "vq_codes_used": int(tokens.unique().numel()),
        "codebook_size": int(pipe.vq.config.codebook_size),
        "target_heldout_ce": target_ce,
        "target_heldout_ppl": math.exp(target_ce),
        "uniform_ppl": float(pipe.target.config.vocab_size),
    }
    if isinstance(pipe.drafter, LlamaGenGPT):
        result["drafter_heldout_ppl"] = math.exp(heldout_cross_entropy(pipe.drafter, labels, tokens))
    if isinstance(pipe.low_res_drafter, LlamaGenGPT):
        side = data.image_size * pipe.low_res_drafter.grid_size // pipe.target.grid_size
        low_data = dataclasses.replace(data, image_size=side)
        low_labels = render_images(low_data, heldout=True)[1]
        low_tokens = cached_tokens(pipe.vq, low_data, heldout_tokens, heldout=True)
        low_ce = heldout_cross_entropy(pipe.low_res_drafter, low_labels, low_tokens)
        result["low_res_drafter_heldout_ppl"] = math.exp(low_ce)
    if isinstance(pipe.upsampler, LlamaGenTokenUpsampler):
        low, high = upsampler_pairs(pipe.vq, UpsamplerTrainConfig(data=data, scale=pipe.upsampler.config.scale),
                                    heldout=True, tokens=heldout_tokens)
        result["upsampler_heldout_accuracy"] = upsampler_accuracy(pipe.upsampler.upsample, low, high)
        result["decode_resize_encode_heldout_accuracy"] = upsampler_accuracy(DecodeResizeEncode(pipe.vq), low, high)

    class_labels = list(range(min(8, pipe.target.config.num_classes))) if class_labels is None else class_labels
    methods = {"baseline": (None, 0), "sjd": ("sjd", sjd_draft_tokens)}
    if isinstance(pipe.drafter, LlamaGenGPT):
        methods["draft-model"] = ("draft-model", model_draft_tokens)
    pipe.set_progress_bar_config(disable=True)
    generation = {}
    # One untimed call first: the first forward of each shape pays one-off allocation costs.
    pipe(class_labels=[class_labels[0]], guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed),
         output_type="pt")
    for name, (method, num_draft) in methods.items():
        steps, accepted, seconds = [], [], []
        for i, label in enumerate(class_labels):
            start = time.perf_counter()
            out = pipe(
                class_labels=[label], guidance_scale=guidance_scale, temperature=1.0,
                generator=torch.Generator().manual_seed(seed + i), speculative=method,
                num_draft_tokens=max(num_draft, 1), output_type="pt",
            )
            seconds.append(time.perf_counter() - start)
            steps.append(out.stats.steps)
            accepted.append(out.stats.mean_accepted)
        generation[name] = {
            "num_draft_tokens": num_draft,
            "steps": float(np.mean(steps)),
            "mean_accepted": float(np.mean(accepted)),
            "seconds_per_image": float(np.mean(seconds)),
        }
    result["generation"] = generation
    result["generation_settings"] = {
        "class_labels": class_labels, "seed": seed, "guidance_scale": guidance_scale, "temperature": 1.0,
        "top_k": None, "acceptance": "exact", "tokens_per_image": int(pipe.target.config.block_size),
    }
    return result


# ---------------------------------------------------------------------------------------- images
def _upscaled(image: PIL.Image.Image, scale: int) -> PIL.Image.Image:
    return image.resize((image.width * scale, image.height * scale), PIL.Image.NEAREST)


def _labelled_grid(
    rows: list[list[PIL.Image.Image]], row_labels: list[str], scale: int, label_width: int
) -> PIL.Image.Image:
    """Rows of equally sized images with a text label left of each row, on white."""
    side = rows[0][0].width * scale
    pad = 4
    width = label_width + max(len(r) for r in rows) * (side + pad) + pad
    grid = PIL.Image.new("RGB", (width, len(rows) * (side + pad) + pad), (255, 255, 255))
    draw = PIL.ImageDraw.Draw(grid)
    for r, (row, label) in enumerate(zip(rows, row_labels)):
        top = pad + r * (side + pad)
        draw.text((pad, top + side // 2 - 6), label, fill=(0, 0, 0))
        for c, image in enumerate(row):
            grid.paste(_upscaled(image, scale), (label_width + pad + c * (side + pad), top))
    return grid


@torch.no_grad()
def save_sample_grid(
    pipe: LlamaGenPipeline,
    path: str | Path,
    class_labels: list[int],
    class_names: list[str],
    seeds: list[int],
    guidance_scale: float = 3.0,
    scale: int = 3,
) -> Path:
    """Write a PNG of generated samples: one row per class (labelled ``"<id> <name>"``), one
    column per seed (``torch.Generator().manual_seed(seed)``, temperature 1, plain AR sampling)."""
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for label in class_labels:
        rows.append([
            pipe(class_labels=[label], guidance_scale=guidance_scale,
                 generator=torch.Generator().manual_seed(seed)).images[0]
            for seed in seeds
        ])
    names = [f"{label} {class_names[label]}"[:30] for label in class_labels]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    _labelled_grid(rows, names, scale, label_width=180).save(out)
    return out


@torch.no_grad()
def save_reconstruction_grid(
    vq: LlamaGenVQ, data: EmojiDataConfig, path: str | Path, n: int = 16, scale: int = 3
) -> Path:
    """Write a PNG with ``n`` held-out scenes (top row) above their VQ reconstructions (bottom)."""
    images, _ = render_images(data, heldout=True)
    images = images[:n]
    quant, _ = vq.encode(to_model_range(images))
    recon = ((vq.decode(quant) + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)

    def to_pil(batch: torch.Tensor) -> list[PIL.Image.Image]:
        return [PIL.Image.fromarray(x.permute(1, 2, 0).numpy()) for x in batch]

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    _labelled_grid([to_pil(images), to_pil(recon)], ["original", "VQ recon"], scale, label_width=70).save(out)
    return out


# ---------------------------------------------------------------------------------------- pipeline
def save_reference_pipeline(
    vq: LlamaGenVQ, target: LlamaGenGPT, drafter: LlamaGenGPT | None, data: EmojiDataConfig, out: str | Path,
    recipe: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32,
    low_res_drafter: LlamaGenGPT | None = None, upsampler: LlamaGenTokenUpsampler | None = None,
) -> LlamaGenPipeline:
    """Assemble a :class:`LlamaGenPipeline` and ``save_pretrained`` it to ``out`` with the class
    list (:data:`CLASSES_FILE`) and, if given, the recipe (:data:`RECIPE_FILE`).

    Args:
        low_res_drafter, upsampler: MuLo-SD's drafter over a smaller grid and its learned
            up-sampler (optional).
        dtype: storage dtype of the weights (float16 halves the folder; load with
            ``torch_dtype=torch.float32``). The returned pipeline is float32 and holds the weights
            as stored (rounded through ``dtype``), so evaluating it measures the saved model.
    """
    pipe = LlamaGenPipeline(target=target, vq=vq, drafter=drafter, low_res_drafter=low_res_drafter, upsampler=upsampler)
    out = Path(out)
    models = [m for m in (target, vq, drafter, low_res_drafter, upsampler) if m is not None]
    # torch's Module.to, not ModelMixin.to: the latter warns about modules to keep in float32,
    # which these models do not have.
    for model in models:
        torch.nn.Module.to(model, dtype)
    try:
        pipe.save_pretrained(out)
    finally:
        for model in models:
            torch.nn.Module.to(model, torch.float32)
    glyphs = data.dataset(heldout=True).glyphs
    classes = [{"label": i, "char": g.char, "name": g.name} for i, g in enumerate(glyphs)]
    (out / CLASSES_FILE).write_text(json.dumps(classes, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if recipe is not None:
        (out / RECIPE_FILE).write_text(json.dumps(recipe, indent=1) + "\n")
    return pipe


# ---------------------------------------------------------------------------------------- CLI
def reference_configs(preset: str, seed: int = 0) -> dict[str, VQTrainConfig | GPTTrainConfig | UpsamplerTrainConfig]:
    """The configuration of each stage (:data:`STAGES`) of a preset: ``"reference"`` (the embedded
    default) or ``"tiny"`` (seconds on a CPU; for tests and smoke runs)."""
    if preset == "reference":
        data = EmojiDataConfig(seed=seed)
        return {"vq": VQTrainConfig(data=data, seed=seed), "gpt": GPTTrainConfig(data=data, seed=seed),
                "draft": GPTTrainConfig.draft(data=data, seed=seed + 1),
                "low-res-draft": GPTTrainConfig.low_res_draft(data), "upsampler": UpsamplerTrainConfig(data=data)}
    if preset == "tiny":
        data = EmojiDataConfig(image_size=16, num_classes=4, num_samples=64, heldout_samples=8, seed=seed)
        small = {"steps": 4, "batch_size": 8, "dim": 16, "n_layer": 1, "n_head": 2, "warmup_steps": 1, "checkpoint_every": 2}
        return {
            "vq": VQTrainConfig(data=data, seed=seed, steps=4, batch_size=8, codebook_size=32, ch_mult=(1, 2),
                                z_channels=32, restart_every=2, warmup_steps=1, checkpoint_every=2),
            "gpt": GPTTrainConfig(data=data, seed=seed, **{**small, "dim": 32}),
            "draft": GPTTrainConfig.draft(data=data, seed=seed + 1, **small),
            "low-res-draft": GPTTrainConfig.low_res_draft(data, **small),
            "upsampler": UpsamplerTrainConfig(data=data, dim=32, steps=4, batch_size=8, warmup_steps=1, checkpoint_every=2),
        }
    raise ValueError(f"unknown preset {preset!r}: 'reference' or 'tiny'")


def add_train_reference_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mmspec train-reference``."""
    parser.add_argument("--stage", choices=(*STAGES, "all"), default="all",
                        help="vq, then gpt (target), draft (drafter), low-res-draft (MuLo-SD's drafter at half the "
                             "image side) and upsampler (MuLo-SD's learned up-sampler), which need OUT/vq; all = the five "
                             "in order")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder: OUT/<stage> (save_pretrained), OUT/checkpoints/<stage>, "
                             "and OUT/pipeline + OUT/eval.json once all five exist")
    parser.add_argument("--preset", choices=("reference", "tiny"), default="reference",
                        help="reference = the embedded default's recipe; tiny = a seconds-long smoke run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vq-steps", type=int, default=None, help="override the preset's VQ steps")
    parser.add_argument("--gpt-steps", type=int, default=None, help="override the preset's target steps")
    parser.add_argument("--draft-steps", type=int, default=None, help="override the preset's drafter steps")
    parser.add_argument("--low-res-draft-steps", type=int, default=None,
                        help="override the preset's low-resolution drafter steps")
    parser.add_argument("--upsampler-steps", type=int, default=None, help="override the preset's up-sampler steps")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="override the preset's checkpoint interval")
    parser.add_argument("--resume", action="store_true", help="continue each stage from its latest checkpoint")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the models train (default: cuda when available); evaluation runs on the CPU")
    parser.add_argument("--save-dtype", choices=("float32", "float16"), default="float32",
                        help="storage dtype of OUT/pipeline's weights")
    parser.add_argument("--no-eval", action="store_true", help="skip evaluate_reference on OUT/pipeline")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def train_reference_command(args: argparse.Namespace) -> int:
    """Train the reference tokenizer / target / drafter (``mmspec train-reference``); returns 0."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    presets = reference_configs(args.preset, args.seed)
    common = {"resume": args.resume, "progress": not args.no_progress}
    if args.checkpoint_every is not None:
        common["checkpoint_every"] = args.checkpoint_every
    overrides = {"vq": args.vq_steps, "gpt": args.gpt_steps, "draft": args.draft_steps,
                 "low-res-draft": args.low_res_draft_steps, "upsampler": args.upsampler_steps}
    configs = {}
    for stage, config in presets.items():
        steps = {"steps": overrides[stage]} if overrides[stage] is not None else {}
        configs[stage] = dataclasses.replace(config, checkpoint_dir=str(out / "checkpoints" / stage), **common, **steps)
    stages = STAGES if args.stage == "all" else (args.stage,)
    timings: dict[str, float] = {}
    vq = None
    tokens: dict[EmojiDataConfig, torch.Tensor] = {}  # one tokenisation per rendering of the data
    for stage in stages:
        start = time.perf_counter()
        if stage == "vq":
            vq = train_vq(configs["vq"], args.device)
            vq.save_pretrained(out / "vq")
        else:
            if vq is None:
                if not (out / "vq").is_dir():
                    raise SystemExit(f"stage {stage!r} needs a trained tokenizer in {out / 'vq'}: run --stage vq first")
                vq = LlamaGenVQ.from_pretrained(out / "vq").to(args.device).eval()
            if stage == "upsampler":
                low, high = upsampler_pairs(vq, configs[stage], tokens=tokens)
                train_upsampler(vq, configs[stage], low, high, args.device).save_pretrained(out / stage)
            else:
                tokens_of_stage = cached_tokens(vq, configs[stage].data, tokens)
                train_c2i_gpt(vq, configs[stage], tokens_of_stage, args.device).save_pretrained(out / stage)
        timings[stage] = time.perf_counter() - start
        print(f"{stage}: {timings[stage]:.1f} s -> {out / stage}")
    (out / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    missing = [stage for stage in STAGES if not (out / stage).is_dir()]
    if missing:
        print(f"{out / 'pipeline'} not assembled: stage(s) {', '.join(missing)} not trained yet "
              f"(`mmspec train-reference --stage STAGE --out {out}`)")
    else:
        vq = LlamaGenVQ.from_pretrained(out / "vq").eval()
        gpts = {STAGE_COMPONENTS[stage]: LlamaGenGPT.from_pretrained(out / stage).eval() for stage in STAGE_COMPONENTS}
        recipe = {"preset": args.preset, "seed": args.seed, **{k: dataclasses.asdict(c) for k, c in configs.items()}}
        for config in recipe.values():
            if isinstance(config, dict):
                for key in ("checkpoint_dir", "resume", "progress"):
                    config.pop(key)
        pipe = save_reference_pipeline(vq, gpts["target"], gpts["drafter"], configs["vq"].data, out / "pipeline", recipe,
                                       dtype=getattr(torch, args.save_dtype), low_res_drafter=gpts["low_res_drafter"],
                                       upsampler=LlamaGenTokenUpsampler.from_pretrained(out / "upsampler").eval())
        print(f"pipeline -> {out / 'pipeline'}")
        if not args.no_eval:
            metrics = evaluate_reference(pipe, configs["vq"].data)
            (out / "eval.json").write_text(json.dumps(metrics, indent=1) + "\n")
            print(json.dumps(metrics, indent=1))
    return 0
