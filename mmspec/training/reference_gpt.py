"""Stages 2 and 3 of the reference recipe (:mod:`mmspec.training.reference`): the class-conditional
LlamaGen GPTs (target, drafter, MuLo-SD's low-resolution drafter) trained on VQ tokens."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..pipelines.llamagen import LlamaGenCondition, LlamaGenGPT, LlamaGenVQ
from .loop import TrainRun, clip_and_step, cosine_schedule, param_groups, run_training
from .reference_data import EmojiDataConfig, render_images, tokenize_images


@dataclass
class GPTTrainConfig:
    """Settings of :func:`train_c2i_gpt` (model sizes, optimisation, checkpoints).

    Args:
        data: the emoji data (must be the VQ's).
        steps, batch_size, lr, warmup_steps, seed: as in :class:`~mmspec.training.reference_vq.VQTrainConfig` (AdamW here).
        weight_decay: AdamW decay of matrices and embeddings (LlamaGen: 0.05 on ≥ 2-D parameters).
        dim, n_layer, n_head: :class:`LlamaGenGPT` sizes (``dim / n_head`` divisible by 4).
        class_dropout_prob: share of labels replaced by the null class (LlamaGen: 0.1), which
            trains the unconditional branch of classifier-free guidance.
        grad_clip, checkpoint_dir, checkpoint_every, resume, progress: as in :class:`~mmspec.training.reference_vq.VQTrainConfig`.
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
            raise ValueError(
                f"the low-resolution drafter halves the image side, so it must be even, got {data.image_size}"
            )
        settings: dict[str, Any] = {"seed": data.seed + 2}
        settings.update(overrides)
        return cls.draft(data=dataclasses.replace(data, image_size=data.image_size // 2), **settings)


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


def train_c2i_gpt(
    vq: LlamaGenVQ, config: GPTTrainConfig, tokens: torch.Tensor | None = None, device: str | torch.device = "cpu"
) -> LlamaGenGPT:
    """Train a class-conditional LlamaGen GPT on the emoji data tokenised by ``vq``.

    Args:
        vq: the trained tokenizer (vocabulary = its codebook).
        config: sizes and optimisation (:meth:`GPTTrainConfig.draft` for the drafter).
        tokens: the training images already tokenised by ``vq`` (``[N, h*w]``, as
            :func:`tokenize_images` returns for ``render_images(config.data)``); None tokenises
            them here. Passing them lets the target and drafter stages share one tokenisation.
        device: where the model trains; batches are drawn on the CPU (as in :func:`~mmspec.training.reference_vq.train_vq`).

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
