"""Logits → probabilities → tokens, shared by every target and drafter.

Losslessness depends on the draft and the target using *the same* transformation: one function,
``logits_to_probs``, applies classifier-free guidance, temperature, top-k and top-p in that order,
with LlamaGen's conventions (ties at the top-k threshold survive; top-p keeps the first token that
crosses ``top_p``; see ``autoregressive/models/generate.py`` of LlamaGen).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .kernels.rejection import inverse_cdf_sample


@dataclass(frozen=True)
class SamplingConfig:
    """How target and draft logits become a distribution.

    Args:
        temperature: 0 means greedy (a one-hot distribution on the argmax); > 0 divides the logits.
        top_k: keep the ``top_k`` largest logits (ties at the threshold survive); None = off.
        top_p: nucleus threshold in (0, 1]; 1 = off.
        guidance_scale: classifier-free guidance ``uncond + (cond - uncond) * scale``; used only
            when unconditional logits are given (Ho & Salimans 2022).
        repetition_penalty: CTRL's penalty (Keskar et al. 2019, arXiv 1909.05858, Sec. 4.1) as
            transformers applies it: the logit ``l`` of every token already in the sequence (prompt
            included) becomes ``l / penalty`` if ``l > 0`` else ``l * penalty``; 1 = off. It needs
            the sequence: callers pass ``seen`` to :func:`logits_to_probs` (the causal loop does,
            per verify position, so speculation stays lossless).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    guidance_scale: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k <= 0):
            raise ValueError(
                f"top_k must be a positive integer (leave it unset, None, for no top-k filtering), got {self.top_k!r}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filtering), got {self.top_p}")
        if not self.guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def uses_cfg(self) -> bool:
        """Whether the unconditional branch must be computed (LlamaGen: scale > 1)."""
        return self.guidance_scale > 1.0

    def validate_vocab(self, vocab_size: int) -> None:
        """Raise if this configuration is impossible for a vocabulary of ``vocab_size`` tokens."""
        if self.top_k is not None and self.top_k > vocab_size:
            raise ValueError(
                f"top_k={self.top_k} is larger than the vocabulary ({vocab_size} tokens); "
                f"use top_k <= {vocab_size} or top_k=None to disable top-k filtering"
            )

    @property
    def penalizes_repetition(self) -> bool:
        return self.repetition_penalty != 1.0


def seen_tokens(tokens: torch.Tensor, lengths: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[B, V]`` bool: which ids occur in ``tokens[b, :lengths[b]]`` (``tokens [B, S]``; entries past a
    row's length, padding included, do not count). What :func:`logits_to_probs` takes as ``seen``."""
    valid = torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths[:, None]  # [B, S]
    counts = torch.zeros(tokens.shape[0], vocab_size, device=tokens.device)
    counts.scatter_add_(1, tokens.clamp(0, vocab_size - 1), valid.float())
    return counts > 0


def apply_repetition_penalty(
    logits: torch.Tensor,  # [..., V] float32
    seen: torch.Tensor,  # [..., V] bool (broadcastable)
    penalty: float,
) -> torch.Tensor:
    """CTRL's repetition penalty exactly as transformers' ``RepetitionPenaltyLogitsProcessor``:
    ``l / penalty`` for seen tokens with ``l > 0``, ``l * penalty`` for seen tokens with ``l <= 0``."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def logits_to_probs(
    logits: torch.Tensor,  # [..., V]
    config: SamplingConfig,
    uncond_logits: torch.Tensor | None = None,  # [..., V]
    seen: torch.Tensor | None = None,  # [..., V] bool: tokens already in the sequence
) -> torch.Tensor:
    """CFG combine → repetition penalty → temperature → top-k → top-p → softmax, in float32 (the
    order of transformers' logits processors). Returns ``[..., V]``.

    ``seen`` is required when ``config.repetition_penalty != 1`` (the penalty depends on the
    sequence); it is ignored otherwise."""
    logits = logits.float()
    if uncond_logits is not None and config.uses_cfg:
        uncond_logits = uncond_logits.float()
        logits = uncond_logits + (logits - uncond_logits) * config.guidance_scale
    if config.penalizes_repetition:
        if seen is None:
            raise ValueError(
                "repetition_penalty != 1 needs the tokens already in the sequence: pass seen= (see seen_tokens)"
            )
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if config.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float32)
    if config.temperature != 1.0:  # dividing by 1 changes nothing: one op less per call
        logits = logits / config.temperature
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        threshold = torch.topk(logits, config.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative > config.top_p
        # Shift right: the token that first crosses top_p is kept, and the top-1 always is.
        remove = torch.cat([torch.zeros_like(remove[..., :1]), remove[..., :-1]], dim=-1)
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits.softmax(-1)


#: Largest ``probs.numel()`` :func:`sample_from_probs` samples by exponential race (measured
#: crossover on the CPU, ``benchmarks/sampling_cost.py``: the race wins up to 2,048, loses from 4,096 on).
RACE_MAX_ELEMENTS = 2048


def race_noise(
    num_draws: int,
    shape: tuple[int, ...],  # of each draw's probs: [..., V]
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """The ``exp_noise`` of ``num_draws`` successive :func:`sample_from_probs` calls on probabilities of
    ``shape``, drawn in one op pair instead of two ops per call: ``num_draws`` views ``[*shape]``, or
    ``None`` each when that size samples by inverse CDF (then each call draws its own uniform, as
    before). On the CPU the noise is the same numbers the calls would draw one by one (the generator
    fills the buffer in order, draw after draw), so outputs are unchanged; elsewhere it is other
    numbers of the same distribution. Nothing else may draw from ``generator`` between the calls."""
    if math.prod(shape) > RACE_MAX_ELEMENTS:
        return (None,) * num_draws
    noise = torch.empty(num_draws, *shape, dtype=torch.float32, device=device)
    return noise.exponential_(1.0, generator=generator).unbind(0)


def sample_from_probs(
    probs: torch.Tensor,  # [..., V]
    generator: torch.Generator | None = None,
    exp_noise: torch.Tensor | None = None,  # [..., V] Exp(1) draws, to replay recorded randomness
) -> torch.Tensor:
    """Draw one token per row of ``probs`` (non-negative, need not be normalised); returns ``[...]`` int64.

    Two exact samplers, chosen by size (the same shapes always take the same one, so a seed
    reproduces a run): the exponential race ``argmax(probs / E)``, ``E ~ Exp(1)^V`` per row (what
    ``torch.multinomial`` computes on the CPU), for up to :data:`RACE_MAX_ELEMENTS` probabilities, and
    above that inverse CDF with one uniform per row (:func:`~mmspec.kernels.rejection.inverse_cdf_sample`,
    float64 sums, the rule the rejection kernels use). The race draws ``V`` random numbers per row, the
    inverse CDF one but runs more ops: on one CPU thread the race is 2x faster for one row of 512,
    the inverse CDF 10x faster for ``[16, 8, 512]`` (a Jacobi window at batch 16) and for one row of
    49,152 (an LM's vocabulary). Neither needs a host sync.

    With ``exp_noise`` the draw is always the race on the given noise: tests replay an official run's
    recorded noise with it, and MC-SJD's Gumbel coupling reuses a position's noise across iterations.
    """
    if exp_noise is None and probs.numel() > RACE_MAX_ELEMENTS:
        uniform = torch.rand(probs.shape[:-1], generator=generator, device=probs.device)
        return inverse_cdf_sample(probs, uniform)
    if exp_noise is None:
        exp_noise = torch.empty_like(probs, dtype=torch.float32).exponential_(1.0, generator=generator)
    return (probs.float() / exp_noise).argmax(-1)
