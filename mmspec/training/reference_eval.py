"""Evaluation of the reference models (what the model card reports): VQ reconstruction, held-out
cross-entropy, speculative decoding on the trained pipeline (:mod:`mmspec.training.reference`)."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
import torch

from ..pipelines.llamagen import LlamaGenGPT, LlamaGenTokenUpsampler
from ..pipelines.llamagen.mulo import DecodeResizeEncode
from ..pipelines.llamagen.pipeline_llamagen import LlamaGenPipeline
from .reference_data import EmojiDataConfig, render_images
from .reference_gpt import gpt_training_loss
from .reference_upsampler import (
    UpsamplerTrainConfig,
    cached_tokens,
    upsampler_accuracy,
    upsampler_pairs,
)


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
        low, high = upsampler_pairs(
            pipe.vq,
            UpsamplerTrainConfig(data=data, scale=pipe.upsampler.config.scale),
            heldout=True,
            tokens=heldout_tokens,
        )
        result["upsampler_heldout_accuracy"] = upsampler_accuracy(pipe.upsampler.upsample, low, high)
        result["decode_resize_encode_heldout_accuracy"] = upsampler_accuracy(DecodeResizeEncode(pipe.vq), low, high)

    class_labels = list(range(min(8, pipe.target.config.num_classes))) if class_labels is None else class_labels
    methods = {"baseline": (None, 0), "sjd": ("sjd", sjd_draft_tokens)}
    if isinstance(pipe.drafter, LlamaGenGPT):
        methods["draft-model"] = ("draft-model", model_draft_tokens)
    pipe.set_progress_bar_config(disable=True)
    generation = {}
    # One untimed call first: the first forward of each shape pays one-off allocation costs.
    pipe(
        class_labels=[class_labels[0]],
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    )
    for name, (method, num_draft) in methods.items():
        steps, accepted, seconds = [], [], []
        for i, label in enumerate(class_labels):
            start = time.perf_counter()
            out = pipe(
                class_labels=[label],
                guidance_scale=guidance_scale,
                temperature=1.0,
                generator=torch.Generator().manual_seed(seed + i),
                speculative=method,
                num_draft_tokens=max(num_draft, 1),
                output_type="pt",
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
        "class_labels": class_labels,
        "seed": seed,
        "guidance_scale": guidance_scale,
        "temperature": 1.0,
        "top_k": None,
        "acceptance": "exact",
        "tokens_per_image": int(pipe.target.config.block_size),
    }
    return result
