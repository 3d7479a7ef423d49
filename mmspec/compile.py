"""The fast path: a target (or draft model) whose ``forward`` is compiled with ``torch.compile``.

Speed claims are only honest against a fast baseline (``../shared/DESIGN.md`` §5: on an H100 an
eager decode step of a LlamaGen-XL-sized model costs ~6x a graphed one). ``CompiledTarget`` wraps
any object satisfying the target contract: on CUDA it compiles ``forward`` with
``mode="reduce-overhead"`` (CUDA graphs), elsewhere with the default inductor mode. Shapes are static
per call site (``T = 1`` for the baseline step, ``k + 1`` or ``N`` for verification), so each window
size compiles once. The cache's buffers are marked as static addresses so CUDA graphs may write them
in place (as transformers' ``StaticCache`` does); caches should therefore be reused across calls
(``cache.reset()``) rather than reallocated, or each new cache triggers a recapture.
"""

from __future__ import annotations

from typing import Any

import torch

from .cache import StaticKVCache
from .types import PrefillOutput, TargetOutput


class CompiledTarget:
    """``target`` with a compiled ``forward``; ``prefill`` and ``new_cache`` pass through.

    Args:
        target: the wrapped target (e.g. ``LlamaGenGPT``, ``DecoderLM``).
        mode: ``torch.compile`` mode; default ``"reduce-overhead"`` on CUDA, ``"default"`` elsewhere.
    """

    def __init__(self, target: Any, mode: str | None = None) -> None:
        self.target = target
        device = next(target.parameters()).device
        self.mode = mode or ("reduce-overhead" if device.type == "cuda" else "default")
        self._forward = torch.compile(target.forward, mode=self.mode, fullgraph=True, dynamic=False)

    @property
    def vocab_size(self) -> int:
        return self.target.vocab_size

    def new_cache(self, batch_size: int, max_seq_len: int, cfg: bool = False) -> StaticKVCache:
        cache = self.target.new_cache(batch_size, max_seq_len, cfg=cfg)
        for buf in (cache.k, cache.v, cache.lengths, cache.blocked):
            torch._dynamo.mark_static_address(buf)
        return cache

    def prefill(self, prompt: Any, cache: StaticKVCache) -> PrefillOutput:
        return self.target.prefill(prompt, cache)  # once per call: not worth a compiled graph

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache, attn_mask: torch.Tensor | None
    ) -> TargetOutput:
        out = self._forward(tokens, positions, cache, attn_mask)
        if self.mode == "reduce-overhead":
            # CUDA-graph outputs live in static memory overwritten by the next replay: copy them
            # out, because the loop keeps the features for the drafter until the next step.
            out = TargetOutput(
                *(
                    None if t is None else t.clone()
                    for t in (out.logits, out.hidden_states, out.uncond_logits, out.uncond_hidden_states)
                )
            )
        return out

    __call__ = forward
