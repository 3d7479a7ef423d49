"""The fast path: a target (or draft model) whose ``forward`` is compiled with ``torch.compile``.

Speed claims are only honest against a fast baseline (``../shared/DESIGN.md`` §5: on an H100 an
eager decode step of a LlamaGen-XL-sized model costs ~6x a graphed one). ``CompiledTarget`` wraps
any object satisfying the target contract: on CUDA it compiles ``forward`` with
``mode="reduce-overhead"`` (CUDA graphs), elsewhere with the default inductor mode. Shapes are static
per call site (``T = 1`` for the baseline step, ``k + 1`` or ``N`` for verification), so each window
size compiles once. The cache's buffers are marked as static addresses so CUDA graphs may write them
in place (as transformers' ``StaticCache`` does); caches should therefore be reused across calls
(``cache.reset()``) rather than reallocated, or each new cache triggers a recapture.
:func:`compile_step` is the same for any step function: drafters compile theirs with it (the EAGLE
head's step; a draft model goes through ``CompiledTarget`` itself).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from .cache import StaticKVCache
from .types import PrefillOutput, TargetOutput


def default_mode(device: torch.device) -> str:
    """CUDA graphs on CUDA (``"reduce-overhead"``), inductor's default elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else "default"


def mark_static(cache: StaticKVCache) -> StaticKVCache:
    """Mark ``cache``'s buffers as static addresses, so CUDA graphs write them in place, and keep its
    attention over every slot (one shape per call site, not one per key bucket). Returns it."""
    for buf in (cache.k, cache.v, cache.lengths, cache.blocked):
        torch._dynamo.mark_static_address(buf)
    cache.key_bucket = 0
    cache.limit_keys(None)
    return cache


def compile_step(fn: Callable, mode: str) -> Callable:
    """``fn`` (a model step with static shapes per call site) through ``torch.compile(fullgraph=True)``.

    Under ``"reduce-overhead"`` the tensors it returns live in CUDA-graph memory that the next replay
    overwrites, so they are cloned: callers keep them across calls (a drafter feeds a step's output to
    the next step; the loop keeps the target's features until the next step)."""
    compiled = torch.compile(fn, mode=mode, fullgraph=True, dynamic=False)
    if mode != "reduce-overhead":
        return compiled

    def step(*args, **kwargs):
        out = compiled(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return out.clone()
        fields = (getattr(out, f.name) for f in dataclasses.fields(out))  # a TargetOutput
        return type(out)(*(None if t is None else t.clone() for t in fields))

    return step


class CompiledTarget:
    """``target`` with a compiled ``forward``; ``prefill`` and ``new_cache`` pass through.

    Args:
        target: the wrapped target (e.g. ``LlamaGenGPT``, ``DecoderLM``).
        mode: ``torch.compile`` mode; default ``"reduce-overhead"`` on CUDA, ``"default"`` elsewhere.
    """

    def __init__(self, target: Any, mode: str | None = None) -> None:
        self.target = target
        self.mode = mode or default_mode(next(target.parameters()).device)
        self.forward = compile_step(target.forward, self.mode)

    @property
    def vocab_size(self) -> int:
        return self.target.vocab_size

    def new_cache(self, batch_size: int, max_seq_len: int, cfg: bool = False) -> StaticKVCache:
        return mark_static(self.target.new_cache(batch_size, max_seq_len, cfg=cfg))

    def prefill(self, prompt: Any, cache: StaticKVCache) -> PrefillOutput:
        return self.target.prefill(prompt, cache)  # once per call: not worth a compiled graph

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache, attn_mask: torch.Tensor | None
    ) -> TargetOutput:
        return self.forward(tokens, positions, cache, attn_mask)
