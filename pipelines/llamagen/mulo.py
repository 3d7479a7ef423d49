"""MuLo-SD: multi-scale local speculative decoding for LlamaGen (Peruzzo, Sautière & Habibian 2026,
"Multi-Scale Local Speculative Decoding for Image Generation", arXiv 2601.05149).

A low-resolution AR model (a :class:`LlamaGenGPT` over a smaller token grid, same VQ codebook)
drafts the whole image; an up-sampler turns its grid into a candidate grid at the target's
resolution; the target verifies every candidate in ONE teacher-forced forward (CFG as the target
samples); rejected tokens are repaired LOCALLY: only they and a 2-D neighbourhood around them are
resampled from the target, while accepted tokens elsewhere — also after a rejection in raster
order — are kept. That non-causal repair is why MuLo-SD cannot run in the core's prefix-commit
loop (:func:`mmspec.loops.speculative_generate`); :func:`mulo_generate` is its own loop built from
the core's pieces (static KV cache, target forward, ``logits_to_probs`` / ``sample_from_probs``,
:class:`~mmspec.stats.SpecStats`).

What this module implements (the paper's method section could not be read for this build; its
abstract and reviews name the parts — low-resolution drafter, up-sampler, parallel verification,
probability pooling, local rejection and resampling with neighbourhood expansion — and the
details below are this implementation's definitions, not the paper's):

1. **Draft**: the low-resolution model samples its grid ``[B, h_q, w_q]`` autoregressively (the
   core's baseline loop) with its own random stream (see ``draft_generator``).
2. **Up-sample**: :class:`DecodeResizeEncode` (training-free: VQ decode -> bicubic resize ->
   VQ re-encode), the learned :class:`~.modeling_upsampler.LlamaGenTokenUpsampler`
   (``upsampler="learned"``; the pipeline's ``upsampler`` component) or any
   :class:`TokenUpsampler` -> candidates ``[B, h, w]``.
3. **Verify** (round ``r``): one target forward over the current grid gives, for every position
   ``n``, ``s(n) = p(n)[x_n]``, the target probability of the token there given the grid's
   raster prefix. The pooled score is the MEAN (``pool="mean"``) or MAX (``pool="max"``) of
   ``s`` over the ``pool_size x pool_size`` window centred on ``n``, clipped at the grid's border
   (only in-grid positions count). A still-drafted token is accepted iff its pooled score is
   ``>= tau``. Tokens already resampled from the target are not re-tested.
4. **Local rejection**: the rejected positions are dilated by a square of radius ``radius``
   (Chebyshev distance ``<= radius``); the 8-connected components of that region are the
   rejection islands. All islands are resampled together: step ``t`` draws the ``t``-th position
   (raster order) of every island in one batched target forward, each token from the target
   conditioned on the CURRENT grid's raster prefix (accepted drafts, earlier islands' tokens as
   they stand at that step, this island's new tokens). Positions before the earliest edit keep
   their cached keys/values, so a step only recomputes the span from the earliest edited position
   to the latest queried one.
5. **Re-verify**: edits change the prefix of later drafts, so the next round re-tests every
   remaining draft on the edited grid. A row stops when a verify rejects nothing (``converged``),
   or after ``max_rounds`` rounds (then its last resampling is kept without a further verify).

Guarantee (lossy, no per-token TVD bound): in a row that converged, every kept draft token has a
pooled target probability ``>= tau`` on the FINAL grid (the last verify ran on it). Resampled
tokens are target samples given the grid as it stood when they were drawn; later edits earlier in
raster order (another island, a later round) are not propagated to them — MuLo-SD's locality
assumption. ``tau > 1`` (with ``pool="mean"`` or ``"max"``) accepts nothing: the whole grid is one
island resampled in raster order, token for token the plain AR baseline under the same generator.
:class:`MuLoStats` reports the realised fraction of resampled tokens and, in the ``moved_mass``
fields, ``TVD(point mass at x, p) = 1 - p(x)`` for each kept draft ``x`` (0 for resampled tokens).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F

from mmspec.cache import StaticKVCache
from mmspec.loops import required_cache_len, speculative_generate
from mmspec.sampling import SamplingConfig, logits_to_probs, sample_from_probs
from mmspec.stats import SOURCE_ACCEPTED, SOURCE_PREFILL, SOURCE_RECOVERED, SpecStats

from .modeling_gpt import LlamaGenCondition, LlamaGenGPT
from .modeling_upsampler import LlamaGenTokenUpsampler

__all__ = [
    "DecodeResizeEncode",
    "MuLoConfig",
    "MuLoStats",
    "TokenUpsampler",
    "dilate",
    "island_schedule",
    "label_islands",
    "make_upsampler",
    "mulo_for_pipeline",
    "mulo_generate",
    "mulo_setup",
    "pooled_scores",
]

POOLS = ("mean", "max")
UPSAMPLERS = ("decode-resize-encode", "learned")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class MuLoConfig:
    """MuLo-SD knobs (defaults are this implementation's, not the paper's tuned values: tune them
    with ``mmspec eval``).

    Args:
        tau: acceptance threshold on the pooled target probability (``> 1``: accept nothing).
        pool_size: odd side ``k`` of the pooling window (1 = the token's own probability).
        pool: ``"mean"`` or ``"max"`` over the window's in-grid positions.
        radius: neighbourhood radius ``l`` resampled around each rejected token (0 = only it).
        max_rounds: verify-and-resample rounds per row (>= 1).
        upsampler: ``"decode-resize-encode"`` (training-free) or ``"learned"`` (the pipeline's
            ``upsampler`` component, a trained :class:`~.modeling_upsampler.LlamaGenTokenUpsampler`);
            outside a pipeline pass ``upsampler=model.upsample`` (or any :class:`TokenUpsampler`)
            to :func:`mulo_generate`.
    """

    lossless: ClassVar[bool] = False
    bound: ClassVar[str] = (
        "no per-token TVD bound; in a converged row every kept draft has pooled target probability >= tau "
        "on the final grid"
    )

    tau: float = 0.05
    pool_size: int = 3
    pool: str = "mean"
    radius: int = 1
    max_rounds: int = 4
    upsampler: str = "decode-resize-encode"

    def __post_init__(self) -> None:
        if not self.tau >= 0:
            raise ValueError(f"tau must be >= 0 (a probability threshold; > 1 accepts nothing), got {self.tau}")
        if not _is_int(self.pool_size) or self.pool_size < 1 or self.pool_size % 2 == 0:
            raise ValueError(f"pool_size must be an odd integer >= 1 (a window centred on the token), got {self.pool_size!r}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if not _is_int(self.radius) or self.radius < 0:
            raise ValueError(f"radius must be an integer >= 0, got {self.radius!r}")
        if not _is_int(self.max_rounds) or self.max_rounds < 1:
            raise ValueError(f"max_rounds must be an integer >= 1, got {self.max_rounds!r}")
        if self.upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler must be one of {UPSAMPLERS} (or pass an up-sampler object), got {self.upsampler!r}")


@dataclass
class MuLoStats(SpecStats):
    """:class:`SpecStats` of a MuLo-SD call, over the target grid's ``N = h * w`` positions.

    ``steps``: target forwards after the prefill (verifies + resampling steps).
    ``token_source``: ``accepted`` (a kept draft), ``recovered`` (resampled from the target) or
    ``prefill`` (position 0 resampled from the prefill output); ``token_step``: the target forward
    whose distribution the token was drawn from (resampled) or that last accepted it (drafts).
    ``num_draft_tokens = N`` (the whole grid is one draft): ``proposed_at_depth`` /
    ``accepted_at_depth`` count, per raster position, rows that drafted / kept it.
    ``row_accepted``: kept drafts per row. ``moved_mass_*``: ``1 - p(x)`` for each kept draft ``x``
    at its last verify, 0 for resampled tokens, over all ``B * N`` tokens.
    ``draft_steps``: low-resolution drafter forwards, its prefill included. ``rounds``: ``[B]``
    verifies per row. ``converged``: ``[B]`` whether the row's last verify rejected nothing.
    ``num_islands``: rejection islands resampled, summed over rows and rounds.
    """

    draft_steps: int = 0
    num_islands: int = 0
    rounds: torch.Tensor = field(init=False)
    converged: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.rounds = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        self.converged = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)

    @property
    def resampled_fraction(self) -> float:
        """Share of the grid's tokens that came from the target rather than the draft."""
        generated = self.token_source >= 0
        return float((generated & (self.token_source != SOURCE_ACCEPTED)).sum()) / max(int(generated.sum()), 1)

    @property
    def mean_tokens_per_step(self) -> float:
        """Grid tokens per target forward (prefill excluded)."""
        return self.max_new_tokens / max(self.steps, 1)

    def summary(self) -> dict:
        return {
            **super().summary(),
            "draft_steps": self.draft_steps,
            "resampled_fraction": self.resampled_fraction,
            "mean_rounds": float(self.rounds.float().mean()),
            "converged_fraction": float(self.converged.float().mean()),
            "num_islands": self.num_islands,
        }


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
            raise ValueError("upsampler='learned' needs a trained LlamaGenTokenUpsampler (the pipeline's `upsampler` "
                             "component; train one with `mmspec train-reference --stage upsampler`), or use "
                             "upsampler='decode-resize-encode'")
        return learned.upsample
    raise ValueError(f"unknown up-sampler {name!r}; available: {UPSAMPLERS}")


# --------------------------------------------------------------------------------------------
# Pooled acceptance and rejection islands (2-D, per row)
# --------------------------------------------------------------------------------------------


def pooled_scores(scores: torch.Tensor, pool_size: int, pool: str = "mean") -> torch.Tensor:
    """Pool ``scores [B, h, w]`` over the ``pool_size`` square window centred on each position,
    counting only in-grid positions (mean) or taking their maximum (max). Returns ``[B, h, w]``."""
    x = scores[:, None].float()  # [B, 1, h, w]
    pad = pool_size // 2
    if pool == "mean":
        return F.avg_pool2d(x, pool_size, stride=1, padding=pad, count_include_pad=False)[:, 0]
    if pool == "max":
        return F.max_pool2d(x, pool_size, stride=1, padding=pad)[:, 0]
    raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """``mask [B, h, w]`` grown by every position within Chebyshev distance ``radius``."""
    if radius == 0:
        return mask.clone()
    return F.max_pool2d(mask[:, None].float(), 2 * radius + 1, stride=1, padding=radius)[:, 0] > 0


def label_islands(region: torch.Tensor) -> torch.Tensor:
    """8-connected components of ``region [B, h, w]`` (bool): ``[B, h, w]`` long, 0 outside,
    islands numbered ``1..I_b`` per row in the raster order of their first position.

    Vectorised label propagation (every position takes the largest label among its 8 neighbours
    inside the region until nothing changes; at most one pass per region position), then a
    renumbering by first position.
    """
    batch, height, width = region.shape
    num = height * width
    inside = region[:, None]  # [B, 1, h, w]
    ids = torch.arange(1, num + 1, device=region.device, dtype=torch.float32).view(1, 1, height, width)
    labels = torch.where(inside, ids, 0.0)
    while True:  # deliberate host sync per pass: island detection runs once per round
        grown = torch.where(inside, F.max_pool2d(labels, 3, stride=1, padding=1), 0.0)
        if torch.equal(grown, labels):
            break
        labels = grown
    flat = labels.view(batch, num).long()  # component key = its largest position + 1; 0 outside
    positions = torch.arange(num, device=region.device).expand(batch, num)
    first = torch.full((batch, num + 1), num, dtype=torch.long, device=region.device)
    first.scatter_reduce_(1, flat, positions, reduce="amin")  # [B, N + 1] first position per key
    first[:, 0] = num  # key 0 = outside
    rank = first.argsort(dim=1, stable=True).argsort(dim=1)  # keys ordered by first position
    return torch.where(flat > 0, rank.gather(1, flat) + 1, 0).view(batch, height, width)


def island_schedule(labels: torch.Tensor) -> torch.Tensor:
    """``[B, I, S]`` raster positions of each island (``labels [B, h, w]`` from
    :func:`label_islands`), in raster order, padded with -1; ``I`` = most islands in a row,
    ``S`` = largest island. Step ``t`` of the batched resampling draws ``[:, :, t]``."""
    batch = labels.shape[0]
    flat = labels.flatten(1)  # [B, N]
    num = flat.shape[1]
    num_islands = int(flat.max()) if flat.numel() else 0  # deliberate host sync: once per round
    if num_islands == 0:
        return torch.full((batch, 0, 0), -1, dtype=torch.long, device=labels.device)
    counts = torch.zeros(batch, num_islands + 1, dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat))
    counts = counts[:, 1:]  # [B, I]
    size = int(counts.max())
    positions = torch.arange(num, device=labels.device).expand(batch, num)
    key = torch.where(flat > 0, (flat - 1) * num + positions, num_islands * num + positions)
    order = key.argsort(dim=1)  # by island, then raster position; outside last
    island = flat.gather(1, order) - 1  # [B, N], -1 outside
    offsets = counts.cumsum(1) - counts  # [B, I] first sorted index of each island
    within = torch.arange(num, device=labels.device)[None] - offsets.gather(1, island.clamp(min=0))
    slot = torch.where(island >= 0, island * size + within, num_islands * size)
    out = torch.full((batch, num_islands * size + 1), -1, dtype=torch.long, device=labels.device)
    out.scatter_(1, slot, torch.where(island >= 0, order, -1))
    return out[:, :-1].view(batch, num_islands, size)


def _scatter_rows(buf: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``buf [B, N]`` with ``buf[b, index[b, i]] = values[b, i]`` where ``index >= 0`` (indices are
    distinct per row; -1 entries land in a dropped extra column)."""
    num = buf.shape[1]
    ext = torch.cat([buf, buf[:, :1]], dim=1)
    ext.scatter_(1, torch.where(index >= 0, index, num), values.to(buf.dtype))
    return ext[:, :num]


# --------------------------------------------------------------------------------------------
# The target's view of a grid under local edits
# --------------------------------------------------------------------------------------------


class _TargetGrid:
    """A token grid ``[B, N]`` and the target's distributions over it, kept current with as
    little recomputation as possible.

    Invariants: the cache slots of grid inputs ``< valid`` hold keys/values computed from the
    current tokens, and ``scores[:, n] = p(n)[tokens[:, n]]`` is current for ``n <= valid``
    (``p(n)`` depends on inputs ``< n`` only). A forward over inputs ``[start, stop)`` with
    ``start <= valid`` refreshes outputs ``start + 1 .. stop`` and sets ``valid = stop``; editing
    position ``n`` lowers ``valid`` to ``n``. Every forward counts one step in ``stats``.
    """

    def __init__(self, target: LlamaGenGPT, condition: LlamaGenCondition, cache: StaticKVCache,
                 sampling: SamplingConfig, tokens: torch.Tensor, stats: MuLoStats) -> None:
        pre = target.prefill(condition, cache)
        uncond = pre.output.uncond_logits
        uncond = None if uncond is None else uncond[:, -1]
        self.first_probs = logits_to_probs(pre.output.logits[:, -1], sampling, uncond)  # [B, V] for position 0
        self.target, self.cache, self.sampling, self.stats = target, cache, sampling, stats
        self.tokens = tokens.clone()  # [B, N]
        self.num = tokens.shape[1]
        self.scores = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)  # [B, N]
        self.scores[:, 0] = self.first_probs.gather(1, tokens[:, :1])[:, 0]
        self.valid = 0
        self.window: tuple[int, torch.Tensor, int] | None = None  # (start, probs [B, T, V], step)
        self.dirty = False  # tokens edited since the window's forward

    def forward(self, start: int, stop: int) -> None:
        """Run the target over grid inputs ``[start, stop)`` (``start <= valid``)."""
        batch, cls = self.tokens.shape[0], self.target.cls_token_num
        self.cache.rollback(torch.full((batch,), cls + start, dtype=torch.long, device=self.cache.device))
        positions = (cls + torch.arange(start, stop, device=self.tokens.device)).expand(batch, -1)  # [B, T]
        out = self.target.forward(self.tokens[:, start:stop], positions, self.cache, None)
        probs = logits_to_probs(out.logits, self.sampling, out.uncond_logits)  # [B, T, V]
        self.stats.steps += 1
        self.scores[:, start + 1 : stop + 1] = probs.gather(2, self.tokens[:, start + 1 : stop + 1, None])[..., 0]
        self.window = (start, probs, self.stats.steps)
        self.valid, self.dirty = stop, False

    def refresh(self) -> None:
        """Make every ``scores`` entry current (the verify forward)."""
        if self.valid < self.num - 1:
            self.forward(self.valid, self.num - 1)

    def probs_at(self, queries: torch.Tensor, query_list: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(p(q) [B, I, V], step [B, I])`` for grid positions ``queries [B, I]`` (-1 = padding;
        ``query_list``: its valid entries, on the host), given the current tokens."""
        positive = [q for q in query_list if q > 0]
        if positive:
            lo, hi = min(positive) - 1, max(positive)  # inputs whose outputs are needed: [lo, hi)
            window = self.window
            if self.dirty or window is None or lo < window[0] or hi > window[0] + window[1].shape[1]:
                self.forward(min(self.valid, lo), hi)
        batch, num_queries = queries.shape
        vocab = self.first_probs.shape[-1]
        first = self.first_probs[:, None].expand(batch, num_queries, vocab)
        if self.window is None:
            return first, torch.zeros_like(queries)
        start, probs, step = self.window
        index = (queries - 1 - start).clamp(0, probs.shape[1] - 1)  # [B, I]
        from_window = probs.gather(1, index[..., None].expand(-1, -1, vocab))
        is_first = (queries == 0)[..., None]
        return torch.where(is_first, first, from_window), torch.where(queries == 0, 0, step)

    def write(self, queries: torch.Tensor, query_list: list[int], tokens: torch.Tensor, probs: torch.Tensor) -> None:
        """Set ``tokens [B, I]`` at ``queries [B, I]`` (-1 = skip); ``probs``: what they were drawn from."""
        self.tokens = _scatter_rows(self.tokens, queries, tokens)
        self.scores = _scatter_rows(self.scores, queries, probs.gather(2, tokens[..., None])[..., 0])
        self.valid = min(self.valid, min(query_list))
        self.dirty = True


# --------------------------------------------------------------------------------------------
# The MuLo-SD loop
# --------------------------------------------------------------------------------------------


def _fork(generator: torch.Generator | None) -> torch.Generator | None:
    """A generator seeded from ``generator``'s current state WITHOUT advancing it (the draft's
    stream, so the target's draws stay those of the baseline); None stays None (global RNG)."""
    if generator is None:
        return None
    clone = torch.Generator(device=generator.device)
    clone.set_state(generator.get_state())
    seed = int(torch.randint(0, 2**62, (1,), generator=clone, device=generator.device))  # deliberate sync, once
    return torch.Generator(device=generator.device).manual_seed(seed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # deliberate: only with profile=True, to time phases


@torch.no_grad()
def mulo_generate(
    target: LlamaGenGPT,
    draft_model: LlamaGenGPT,
    vq: Any,
    condition: LlamaGenCondition,
    sampling: SamplingConfig,
    config: MuLoConfig = MuLoConfig(),
    generator: torch.Generator | None = None,
    *,
    draft_generator: torch.Generator | None = None,
    upsampler: TokenUpsampler | None = None,
    profile: bool = False,
) -> tuple[torch.Tensor, MuLoStats]:
    """Generate token grids with MuLo-SD (arXiv 2601.05149; the algorithm is in the module docstring).

    Args:
        target: the high-resolution LlamaGen GPT. draft_model: a LlamaGen GPT over a grid no
            larger than the target's, with the same vocabulary (VQ codebook).
        vq: the VQ both grids index (used by the default up-sampler).
        condition: class labels / caption features, shared by draft and target.
        sampling: ONE configuration for the draft and the target (CFG, temperature, top-k/p).
        config: :class:`MuLoConfig`. generator: the target's random stream (resampling draws, in
            the baseline's order: one ``[B, I, V]`` exponential draw per resampling step).
        draft_generator: the drafter's stream; default: forked from ``generator`` without
            advancing it. upsampler: overrides ``config.upsampler``.
        profile: synchronise the device around the draft phase to time it (``stats.draft_time``).

    Returns:
        ``(tokens [B, h, w], MuLoStats)``.
    """
    if draft_model.vocab_size != target.vocab_size:
        raise ValueError(f"the drafter's vocabulary ({draft_model.vocab_size}) must be the target's "
                         f"({target.vocab_size}): same VQ codebook")
    if draft_model.grid_size > target.grid_size:
        raise ValueError(f"the drafter's grid ({draft_model.grid_size}) must not be larger than the target's "
                         f"({target.grid_size})")
    sampling.validate_vocab(target.vocab_size)
    start_time = time.perf_counter()
    batch, grid, num = condition.batch_size, target.grid_size, target.config.block_size
    device = target.device
    stats = MuLoStats(batch, num, num, device=device)

    # 1-2. draft at low resolution (the core's AR loop), up-sample to the target grid
    if profile:
        _sync(device)
    t0 = time.perf_counter()
    draft_num = draft_model.config.block_size
    draft_len = required_cache_len(draft_model.cls_token_num, draft_num, 1)
    draft_cache = draft_model.new_cache(batch, draft_len, cfg=sampling.uses_cfg)
    drafted = speculative_generate(draft_model, condition, draft_cache, max_new_tokens=draft_num, sampling=sampling,
                                   generator=draft_generator if draft_generator is not None else _fork(generator))
    stats.draft_steps = drafted.stats.steps + drafted.stats.prefill_steps
    upsample = upsampler if upsampler is not None else make_upsampler(config.upsampler, vq)
    low = drafted.tokens.view(batch, draft_model.grid_size, draft_model.grid_size)
    candidates = upsample(low, (grid, grid)).to(device).reshape(batch, num)  # [B, N]
    if profile:
        _sync(device)
        stats.draft_time = time.perf_counter() - t0

    # 3-5. verify, reject locally, resample islands; repeat
    cache = target.new_cache(batch, required_cache_len(target.cls_token_num, num, 1), cfg=sampling.uses_cfg)
    state = _TargetGrid(target, condition, cache, sampling, candidates, stats)
    is_draft = torch.ones(batch, num, dtype=torch.bool, device=device)  # still holds the drafted token
    source_step = torch.zeros(batch, num, dtype=torch.long, device=device)
    tested_score = torch.zeros(batch, num, dtype=torch.float32, device=device)
    from_prefill = torch.zeros(batch, num, dtype=torch.bool, device=device)
    for _ in range(config.max_rounds):
        state.refresh()
        active = ~stats.converged
        stats.rounds += active.long()
        pooled = pooled_scores(state.scores.view(batch, grid, grid), config.pool_size, config.pool).view(batch, num)
        tested = is_draft & active[:, None]
        source_step = torch.where(tested, stats.steps, source_step)
        tested_score = torch.where(tested, state.scores, tested_score)
        rejected = tested & (pooled < config.tau)  # [B, N]
        stats.converged |= active & ~rejected.any(1)
        if bool(stats.converged.all()):  # deliberate host sync: once per round
            break
        region = dilate(rejected.view(batch, grid, grid), config.radius)
        schedule = island_schedule(label_islands(region))  # [B, I, S]
        stats.num_islands += int((schedule[:, :, 0] >= 0).sum())
        schedule_host = schedule.cpu()  # deliberate: the step plan of this round
        for step in range(schedule.shape[2]):
            queries = schedule[:, :, step]  # [B, I]
            query_list = schedule_host[:, :, step].flatten().tolist()
            query_list = [q for q in query_list if q >= 0]
            probs, drawn_at = state.probs_at(queries, query_list)  # [B, I, V], [B, I]
            tokens = sample_from_probs(probs, generator)  # [B, I]
            state.write(queries, query_list, tokens, probs)
            source_step = _scatter_rows(source_step, queries, drawn_at)
            from_prefill = _scatter_rows(from_prefill, queries, queries == 0)
        is_draft &= ~region.view(batch, num)

    # stats over the final grid
    kept = is_draft.long()
    stats.token_source = torch.where(is_draft, SOURCE_ACCEPTED, torch.where(from_prefill, SOURCE_PREFILL, SOURCE_RECOVERED))
    stats.token_step = source_step
    stats.row_steps.fill_(stats.steps)
    stats.row_accepted = kept.sum(1)
    stats.proposed_at_depth.fill_(batch)
    stats.accepted_at_depth = kept.sum(0)
    moved = torch.where(is_draft, 1.0 - tested_score, 0.0).double()  # TVD(point mass at x, p) = 1 - p(x)
    stats.moved_mass_sum = moved.sum()
    stats.moved_mass_max = moved.max()
    stats.moved_mass_tokens = torch.tensor(batch * num, device=device)
    stats.total_time = time.perf_counter() - start_time
    return state.tokens.view(batch, grid, grid), stats


def mulo_setup(pipe: Any, acceptance: Any = "mulo",
               acceptance_options: dict | None = None) -> tuple[LlamaGenGPT, MuLoConfig, TokenUpsampler]:
    """Check a pipeline's MuLo-SD settings before any generation: ``(low_res_drafter, config,
    up-sampler)``, or a ValueError that says what is missing or wrong. ``acceptance`` must be
    ``"mulo"`` (or the pipeline's default ``"exact"``, meaning "not chosen"): MuLo-SD has its own
    rule, whose :class:`MuLoConfig` fields come from ``acceptance_options``."""
    if not (isinstance(acceptance, str) and acceptance in ("mulo", "exact")):
        raise ValueError(f"speculative='mulo' has its own acceptance rule: pass acceptance='mulo' with "
                         f"acceptance_options from MuLoConfig (tau, pool_size, pool, radius, max_rounds, upsampler), "
                         f"not {acceptance!r}")
    drafter = pipe.low_res_drafter
    if not isinstance(drafter, LlamaGenGPT):
        raise ValueError("speculative='mulo' needs the pipeline's `low_res_drafter` component: a LlamaGenGPT over a "
                         "smaller grid with the target's codebook (train one with "
                         "`mmspec train-reference --stage low-res-draft`)")
    options = dict(acceptance_options or {})
    known = {f.name for f in fields(MuLoConfig)}
    if set(options) - known:
        raise ValueError(f"unknown MuLo-SD options {sorted(set(options) - known)}; available: {sorted(known)}")
    config = MuLoConfig(**options)
    return drafter, config, make_upsampler(config.upsampler, pipe.vq, pipe.upsampler)


def mulo_for_pipeline(
    pipe: Any,
    condition: LlamaGenCondition,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    acceptance: Any = "mulo",
    acceptance_options: dict | None = None,
) -> tuple[torch.Tensor, MuLoStats]:
    """``LlamaGenPipeline(..., speculative="mulo")``: MuLo-SD with the pipeline's ``low_res_drafter``
    (a LlamaGen GPT over a smaller grid, same codebook), ``vq`` and, for ``upsampler="learned"``,
    its ``upsampler``; ``acceptance`` / ``acceptance_options`` as in :func:`mulo_setup`
    (``mmspec eval`` spec: ``mulo:mulo:tau=0.05,pool_size=3,radius=1``)."""
    drafter, config, upsample = mulo_setup(pipe, acceptance, acceptance_options)
    return mulo_generate(pipe.target, drafter, pipe.vq, condition, sampling, config, generator, upsampler=upsample)
