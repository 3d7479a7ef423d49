"""Stage 4 of the reference recipe (:mod:`mmspec.training.reference`): MuLo-SD's learned token
up-sampler, trained on pairs of the same scenes tokenised at half and full resolution."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..pipelines.llamagen import LlamaGenTokenUpsampler, LlamaGenVQ
from .loop import TrainRun, clip_and_step, cosine_schedule, param_groups, run_training
from .reference_data import EmojiDataConfig, render_images, tokenize_images


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
            checkpoint_every, resume, progress: as in :class:`~mmspec.training.reference_gpt.GPTTrainConfig`.
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
            raise ValueError(
                f"image_size {self.data.image_size} is not divisible by the up-sampler's scale {self.scale}"
            )
        return dataclasses.replace(self.data, image_size=self.data.image_size // self.scale)


def cached_tokens(
    vq: LlamaGenVQ, data: EmojiDataConfig, cache: dict[EmojiDataConfig, torch.Tensor], heldout: bool = False
) -> torch.Tensor:
    """``data``'s training (or held-out) scenes tokenised by ``vq`` (``[N, h*w]``), once per
    rendering: ``cache`` (one per split) keeps each tokenisation for the stages that share it."""
    if data not in cache:
        cache[data] = tokenize_images(vq, render_images(data, heldout)[0])
    return cache[data]


def upsampler_pairs(
    vq: LlamaGenVQ,
    config: UpsamplerTrainConfig,
    heldout: bool = False,
    tokens: dict[EmojiDataConfig, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low [N, h, w], high [N, h * scale, w * scale])`` token grids of the same scenes, tokenised
    by ``vq``. ``tokens``: a :func:`cached_tokens` cache of the same split (None: a fresh one)."""
    cache = {} if tokens is None else tokens
    grids = []
    for data in (config.low_data, config.data):
        flat = cached_tokens(vq, data, cache, heldout)
        side = math.isqrt(flat.shape[1])
        grids.append(flat.view(-1, side, side))
    return grids[0], grids[1]


def train_upsampler(
    vq: LlamaGenVQ,
    config: UpsamplerTrainConfig,
    low: torch.Tensor | None = None,
    high: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
) -> LlamaGenTokenUpsampler:
    """Train MuLo-SD's learned up-sampler: per-position cross-entropy of the full-resolution
    tokens ``high [N, H, W]`` given the same scenes' low-resolution tokens ``low [N, H/s, W/s]``
    (None: tokenised here by :func:`upsampler_pairs`). AdamW, warm-up + cosine, gradient clipping,
    checkpoints and resume as every recipe stage. Returns the model in eval mode on ``device``."""
    if low is None or high is None:
        low, high = upsampler_pairs(vq, config)
    if low.shape[0] != high.shape[0] or tuple(high.shape[1:]) != (
        low.shape[1] * config.scale,
        low.shape[2] * config.scale,
    ):
        raise ValueError(
            f"low {tuple(low.shape)} and high {tuple(high.shape)} grids are not pairs at scale {config.scale}"
        )
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
def upsampler_accuracy(
    upsample: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor],
    low: torch.Tensor,
    high: torch.Tensor,
    batch_size: int = 256,
) -> float:
    """Share of positions where ``upsample(low)`` gives the token the full-resolution rendering of
    the same scene has (``low [N, h, w]``, ``high [N, H, W]``)."""
    hits = 0
    for first in range(0, low.shape[0], batch_size):
        rows = slice(first, first + batch_size)
        hits += int((upsample(low[rows], tuple(high.shape[1:])).cpu() == high[rows]).sum())
    return hits / high.numel()
