"""MuLo-SD: multi-scale local speculative decoding for LlamaGen (Peruzzo, Sautière & Habibian 2026,
"Multi-Scale Local Speculative Decoding for Image Generation", arXiv 2601.05149), on the engine's
masked loop (:func:`mmspec.loops.masked_generate`).

A low-resolution AR model (a :class:`LlamaGenGPT` over a smaller token grid, same VQ codebook)
drafts the whole image; an up-sampler turns its grid into a candidate grid at the target's
resolution; the target verifies every candidate in ONE teacher-forced forward (CFG as the target
samples); rejected tokens are repaired LOCALLY: only they and a 2-D neighbourhood around them are
resampled from the target, while accepted tokens elsewhere — also after a rejection in raster
order — are kept. This module holds the two LlamaGen-specific roles; the acceptance rule
(pooled threshold + dilation, :class:`mmspec.elementwise.PooledThresholdAcceptance`, ``"mulo"``)
and the loop are the engine's.

1. **Draft** (:class:`LowResDrafter`): the low-resolution model samples its grid ``[B, h_q, w_q]``
   autoregressively (the engine's causal loop, baseline mode) with its own random stream.
2. **Up-sample**: :class:`DecodeResizeEncode` (training-free: VQ decode -> bicubic resize -> VQ
   re-encode), the learned :class:`~.modeling_upsampler.LlamaGenTokenUpsampler`
   (``upsampler="learned"``; the pipeline's ``upsampler`` component) or any
   :class:`TokenUpsampler` -> candidates ``[B, h, w]``.
3. **Verify** (round ``r``, :class:`GridTarget`): one target forward over the current grid gives,
   for every position ``n``, ``p(n)`` given the grid's raster prefix; the rule keeps a still-drafted
   token iff its pooled score is ``>= tau``, and hands back the rejected tokens dilated by
   ``radius``. Tokens already resampled from the target are not re-tested.
4. **Local repair** (:meth:`GridTarget.regenerate`): the 8-connected components of the handed-back
   region are the rejection islands. All islands are resampled together: step ``t`` draws the
   ``t``-th position (raster order) of every island in one batched target forward, each token from
   the target conditioned on the CURRENT grid's raster prefix. Positions before the earliest edit
   keep their cached keys/values, so a step only recomputes the span from the earliest edited
   position to the latest queried one.
5. **Re-verify**: edits change the prefix of later drafts, so the next round re-tests every
   remaining draft on the edited grid. A row stops when a verify rejects nothing (``converged``),
   or after ``max_rounds`` rounds (then its last resampling is kept without a further verify).

Guarantee (lossy, no per-token TVD bound): in a row that converged, every kept draft token has a
pooled target probability ``>= tau`` on the FINAL grid. Resampled tokens are target samples given
the grid as it stood when they were drawn; later edits earlier in raster order are not propagated
to them — MuLo-SD's locality assumption. ``tau > 1`` accepts nothing: the whole grid is one island
resampled in raster order, token for token the plain AR baseline under the same generator.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F

from mmspec.cache import StaticKVCache
from mmspec.grid import island_schedule, label_islands
from mmspec.kernels.rows import gather_rows
from mmspec.loops import fork_generator, masked_generate, required_cache_len, speculative_generate
from mmspec.rules import get_acceptance_rule
from mmspec.sampling import SamplingConfig, logits_to_probs, sample_from_probs
from mmspec.stats import MaskedStats
from mmspec.types import Categorical, Draft, Regeneration

from .modeling_gpt import LlamaGenCondition, LlamaGenGPT
from .modeling_upsampler import LlamaGenTokenUpsampler

__all__ = [
    "DecodeResizeEncode",
    "GridTarget",
    "LowResDrafter",
    "TokenUpsampler",
    "UPSAMPLERS",
    "make_upsampler",
    "mulo_generate",
]

UPSAMPLERS = ("decode-resize-encode", "learned")


# --------------------------------------------------------------------------------------------
# Up-sampling a low-resolution token grid to the target's grid
# --------------------------------------------------------------------------------------------


class TokenUpsampler(Protocol):
    """``upsampler(tokens [B, h_q, w_q], (h, w)) -> tokens [B, h, w]`` in the same codebook (the
    paper's up-sampler ``U_r``; a learned one plugs in here)."""

    def __call__(self, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor: ...


class DecodeResizeEncode:
    """Training-free up-sampler: VQ decode -> resize (``mode``, bicubic by default, clamped to the
    VQ's [-1, 1] input range) -> VQ re-encode.

    ``vq``: anything with ``decode_code(indices [B, h, w]) -> images [B, 3, H, W]`` and
    ``encode(images) -> (quant, indices [B, h', w'])`` (:class:`LlamaGenVQ`). At equal grid sizes
    the resize is skipped (the identity), so the round trip is exactly ``encode(decode(x))``.
    """

    def __init__(self, vq: Any, mode: str = "bicubic") -> None:
        self.vq = vq
        self.mode = mode

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        low_h, low_w = tokens.shape[1:]
        height, width = size
        if height % low_h or width % low_w:
            raise ValueError(f"the target grid {height}x{width} must be a multiple of the draft grid {low_h}x{low_w}")
        images = self.vq.decode_code(tokens)  # [B, 3, h_q * f, w_q * f]
        if (height, width) != (low_h, low_w):
            pixels = (images.shape[-2] * height // low_h, images.shape[-1] * width // low_w)
            resized = F.interpolate(images.float(), size=pixels, mode=self.mode, align_corners=False)
            images = resized.clamp(-1, 1).to(images.dtype)  # [B, 3, h * f, w * f]
        _, indices = self.vq.encode(images)  # [B, h, w]
        if tuple(indices.shape[1:]) != (height, width):
            raise ValueError(f"the VQ encoded a {tuple(indices.shape[1:])} grid, expected {(height, width)}")
        return indices.long()


def make_upsampler(name: str, vq: Any, learned: LlamaGenTokenUpsampler | None = None) -> TokenUpsampler:
    """The named up-sampler: ``"decode-resize-encode"`` over ``vq``, or ``"learned"``, which is
    ``learned`` (a trained :class:`LlamaGenTokenUpsampler`)."""
    if name == "decode-resize-encode":
        return DecodeResizeEncode(vq)
    if name == "learned":
        # torch.compile wraps a module (its attributes, ``upsample`` included, still resolve)
        if not isinstance(getattr(learned, "_orig_mod", learned), LlamaGenTokenUpsampler):
            raise ValueError(
                "upsampler='learned' needs a trained LlamaGenTokenUpsampler (the pipeline's `upsampler` "
                "component; train one with `mmspec train-reference --stage upsampler`), or use "
                "upsampler='decode-resize-encode'"
            )
        return learned.upsample
    raise ValueError(f"unknown up-sampler {name!r}; available: {UPSAMPLERS}")


# --------------------------------------------------------------------------------------------
# The drafter: low-resolution AR model + up-sampler
# --------------------------------------------------------------------------------------------


class LowResDrafter:
    """MuLo-SD's drafter (a :class:`~mmspec.types.MaskedDrafter`): samples the whole grid with a
    low-resolution LlamaGen GPT, up-samples it to the target's grid, and proposes every position.
    It samples with the target's :class:`~mmspec.sampling.SamplingConfig` (``target.sampling``: one
    configuration for both) from its own random stream: ``generator`` if given, otherwise forked
    (:func:`mmspec.loops.fork_generator`) from the loop's generator at the first draft, before the
    target draws anything.

    Args:
        model: a :class:`LlamaGenGPT` over a grid no larger than the target's, same codebook.
        upsampler: ``(tokens [B, h_q, w_q], (h, w)) -> [B, h, w]``. grid: the target's grid side.
    """

    def __init__(
        self, model: LlamaGenGPT, upsampler: TokenUpsampler, grid: int, generator: torch.Generator | None = None
    ) -> None:
        self.model, self.upsampler, self.grid, self.generator = model, upsampler, grid, generator
        self.forwards = 0
        self._forked = generator is not None

    def draft(self, condition: LlamaGenCondition, target: GridTarget, generator: torch.Generator | None) -> Draft:
        if not self._forked:
            self.generator, self._forked = fork_generator(generator), True
        num, sampling = self.model.config.block_size, target.sampling
        cache = self.model.new_cache(
            condition.batch_size, required_cache_len(self.model.cls_token_num, num, 1), cfg=sampling.uses_cfg
        )
        drafted = speculative_generate(
            self.model, condition, cache, max_new_tokens=num, sampling=sampling, generator=self.generator
        )
        self.forwards += drafted.stats.steps + drafted.stats.prefill_steps
        side = self.model.grid_size
        low = drafted.tokens.view(condition.batch_size, side, side)
        candidates = self.upsampler(low, (self.grid, self.grid)).to(drafted.tokens.device)  # [B, h, w]
        candidates = candidates.reshape(condition.batch_size, self.grid * self.grid)
        positions = torch.arange(candidates.shape[1], device=candidates.device).expand_as(candidates)
        return Draft(candidates, positions=positions)


# --------------------------------------------------------------------------------------------
# The target's view of a grid under local edits
# --------------------------------------------------------------------------------------------


def _scatter_rows(buf: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``buf [B, N, ...]`` with ``buf[b, index[b, i]] = values[b, i]`` where ``index >= 0`` (indices
    are distinct per row; -1 entries land in a dropped extra row)."""
    num = buf.shape[1]
    ext = torch.cat([buf, buf[:, :1]], dim=1)
    where = torch.where(index >= 0, index, num)
    where = where.view(*where.shape, *([1] * (buf.dim() - 2))).expand(*where.shape, *buf.shape[2:])
    ext.scatter_(1, where, values.to(buf.dtype))
    return ext[:, :num]


class GridTarget:
    """A LlamaGen GPT over one generation's token grid (a :class:`~mmspec.types.MaskedTarget`):
    keeps the target's distributions over the grid current with as little recomputation as
    possible.

    Invariants: the cache slots of grid inputs ``< valid`` hold keys/values computed from the
    current tokens, and ``probs[:, n]`` (``[B, N, V]``, the target's distribution of position
    ``n``) is current for ``n <= valid`` (``p(n)`` depends on inputs ``< n`` only). A forward over
    inputs ``[start, stop)`` with ``start <= valid`` refreshes outputs ``start + 1 .. stop`` and
    sets ``valid = stop``; editing position ``n`` lowers ``valid`` to ``n``. Memory: ``B * N * V``
    floats for ``probs`` (LlamaGen-XL 24x24 grid, 16384 codes: 38 MB per row).
    """

    def __init__(self, model: LlamaGenGPT, sampling: SamplingConfig, batch_size: int) -> None:
        self.model, self.sampling = model, sampling
        self.num_elements = model.config.block_size
        self.grid = model.grid_size
        self.cache: StaticKVCache = model.new_cache(
            batch_size, required_cache_len(model.cls_token_num, self.num_elements, 1), cfg=sampling.uses_cfg
        )
        self.tokens = torch.zeros(batch_size, self.num_elements, dtype=torch.long, device=model.device)  # [B, N]
        self.steps = 0
        self.valid = 0
        self.window: tuple[int, torch.Tensor, int] | None = None  # (start, probs [B, T, V], step)
        self.dirty = False  # tokens edited since the window's forward
        self.probs: torch.Tensor | None = None  # [B, N, V]
        self.first_probs: torch.Tensor | None = None  # [B, V] position 0, from the prefill

    @property
    def elements(self) -> torch.Tensor:
        return self.tokens

    def prefill(self, condition: LlamaGenCondition) -> None:
        pre = self.model.prefill(condition, self.cache)
        uncond = pre.output.uncond_logits
        self.first_probs = logits_to_probs(
            pre.output.logits[:, -1], self.sampling, None if uncond is None else uncond[:, -1]
        )
        batch, vocab = self.first_probs.shape
        self.probs = self.first_probs[:, None].expand(batch, self.num_elements, vocab).clone()
        self._drafted = False

    def finished(self) -> torch.Tensor:
        """One draft covers the whole grid: finished once it was written."""
        return torch.full((self.tokens.shape[0],), self._drafted, dtype=torch.bool, device=self.tokens.device)

    def write(self, positions: torch.Tensor, elements: torch.Tensor, mask: torch.Tensor) -> None:
        """Set tokens (no score update: a verify refreshes what it needs)."""
        index = torch.where(mask, positions, -1)
        self.tokens = _scatter_rows(self.tokens, index, elements)
        self._drafted = True
        if bool(mask.any()):  # deliberate host sync: edits invalidate the cache from their first position
            self.valid = min(self.valid, int(torch.where(mask, positions, self.num_elements).min()))
            self.dirty = True

    def _forward(self, start: int, stop: int) -> None:
        """Run the target over grid inputs ``[start, stop)`` (``start <= valid``)."""
        batch, cls = self.tokens.shape[0], self.model.cls_token_num
        self.cache.rollback(torch.full((batch,), cls + start, dtype=torch.long, device=self.cache.device))
        positions = (cls + torch.arange(start, stop, device=self.tokens.device)).expand(batch, -1)  # [B, T]
        out = self.model.forward(self.tokens[:, start:stop], positions, self.cache, None)
        probs = logits_to_probs(out.logits, self.sampling, out.uncond_logits)  # [B, T, V]
        self.steps += 1
        last = min(stop, self.num_elements - 1)
        self.probs[:, start + 1 : last + 1] = probs[:, : last - start]
        self.window = (start, probs, self.steps)
        self.valid, self.dirty = stop, False

    def verify(self, positions: torch.Tensor) -> Categorical:
        """The target's distributions over the whole current grid (one forward from the earliest
        stale position; none if nothing changed)."""
        if self.valid < self.num_elements - 1:
            self._forward(self.valid, self.num_elements - 1)
        return Categorical(gather_rows(self.probs, positions))

    def _probs_at(self, queries: torch.Tensor, query_list: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(p(q) [B, I, V], step [B, I])`` for grid positions ``queries [B, I]`` (-1 = padding;
        ``query_list``: its valid entries, on the host), given the current tokens."""
        positive = [q for q in query_list if q > 0]
        if positive:
            lo, hi = min(positive) - 1, max(positive)  # inputs whose outputs are needed: [lo, hi)
            window = self.window
            if self.dirty or window is None or lo < window[0] or hi > window[0] + window[1].shape[1]:
                self._forward(min(self.valid, lo), hi)
        batch, num_queries = queries.shape
        vocab = self.first_probs.shape[-1]
        first = self.first_probs[:, None].expand(batch, num_queries, vocab)
        if self.window is None:
            return first, torch.zeros_like(queries)
        start, probs, step = self.window
        index = (queries - 1 - start).clamp(0, probs.shape[1] - 1)  # [B, I]
        from_window = gather_rows(probs, index)
        is_first = (queries == 0)[..., None]
        return torch.where(is_first, first, from_window), torch.where(queries == 0, 0, step)

    def regenerate(
        self, positions: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None
    ) -> Regeneration:
        """Resample the masked positions island by island (8-connected components of the mask on
        the grid), every island's ``t``-th position (raster order) in one batched target step, each
        from the target given the current grid (module docstring, step 4)."""
        batch = self.tokens.shape[0]
        region = _scatter_rows(torch.zeros_like(self.tokens, dtype=torch.bool), torch.where(mask, positions, -1), mask)
        schedule = island_schedule(label_islands(region.view(batch, self.grid, self.grid)))  # [B, I, S]
        drawn = torch.full_like(self.tokens, -1)
        num_regions = int((schedule[:, :, 0] >= 0).sum()) if schedule.numel() else 0  # deliberate sync, once per round
        schedule_host = schedule.cpu()  # deliberate: the step plan of this round
        for step in range(schedule.shape[2]):
            queries = schedule[:, :, step]  # [B, I]
            query_list = [q for q in schedule_host[:, :, step].flatten().tolist() if q >= 0]
            probs, drawn_at = self._probs_at(queries, query_list)  # [B, I, V], [B, I]
            tokens = sample_from_probs(probs, generator)  # [B, I]
            self.tokens = _scatter_rows(self.tokens, queries, tokens)
            self.probs = _scatter_rows(self.probs, queries, probs)
            self.valid = min(self.valid, min(query_list))
            self.dirty = True
            drawn = _scatter_rows(drawn, queries, drawn_at)
        return Regeneration(step=drawn.gather(1, positions), num_regions=num_regions)


# --------------------------------------------------------------------------------------------
# MuLo-SD without a pipeline
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def mulo_generate(
    target: LlamaGenGPT,
    draft_model: LlamaGenGPT,
    condition: LlamaGenCondition,
    sampling: SamplingConfig,
    upsampler: TokenUpsampler,
    generator: torch.Generator | None = None,
    *,
    acceptance_options: dict | None = None,
    max_rounds: int = 4,
    draft_generator: torch.Generator | None = None,
    profile: bool = False,
) -> tuple[torch.Tensor, MaskedStats]:
    """MuLo-SD over two models (the module docstring has the algorithm): the engine's masked loop
    with a :class:`LowResDrafter`, a :class:`GridTarget` and the ``"mulo"`` rule.
    ``LlamaGenPipeline(..., speculative="mulo")`` runs the same pieces from its components.

    Args:
        target: the high-resolution LlamaGen GPT. draft_model: a LlamaGen GPT over a grid no
            larger than the target's, with the same vocabulary (VQ codebook).
        condition: class labels / caption features, shared by draft and target.
        sampling: ONE configuration for the draft and the target (CFG, temperature, top-k/p).
        upsampler: low-resolution grid -> target grid (:func:`make_upsampler`).
        generator: the target's random stream (resampling draws, in the baseline's order).
        acceptance_options: the ``"mulo"`` rule's options (``tau``, ``pool_size``, ``pool``, ``radius``).
        max_rounds: verify-and-resample rounds (>= 1). draft_generator: the drafter's stream;
            default: forked from ``generator`` without advancing it. profile: time the drafting.

    Returns:
        ``(tokens [B, h, w], MaskedStats)``.
    """
    check_pair(target, draft_model)
    sampling.validate_vocab(target.vocab_size)
    rule = get_acceptance_rule("mulo", {"grid": (target.grid_size, target.grid_size)}, **(acceptance_options or {}))
    drafter = LowResDrafter(draft_model, upsampler, target.grid_size, draft_generator)
    grid = GridTarget(target, sampling, condition.batch_size)
    out = masked_generate(
        grid, drafter, condition, acceptance=rule, max_rounds=max_rounds, generator=generator, profile=profile
    )
    return out.elements.view(-1, target.grid_size, target.grid_size), out.stats


def check_pair(target: LlamaGenGPT, draft_model: LlamaGenGPT) -> None:
    """A ValueError unless ``draft_model`` can draft for ``target`` in MuLo-SD."""
    if draft_model.vocab_size != target.vocab_size:
        raise ValueError(
            f"the drafter's vocabulary ({draft_model.vocab_size}) must be the target's "
            f"({target.vocab_size}): same VQ codebook"
        )
    if draft_model.grid_size > target.grid_size:
        raise ValueError(
            f"the drafter's grid ({draft_model.grid_size}) must not be larger than the target's ({target.grid_size})"
        )
