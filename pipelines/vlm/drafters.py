"""Vision-aware EAGLE drafters for VLM targets: one EAGLE head, pluggable *visual paths*.

A VLM prompt is dominated by image tokens. The drafter is an EAGLE head (Li et al. 2024, arXiv
2401.15077: one decoder block over ``fc([token embedding ; target feature])``, the target's
embedding and LM head shared and frozen) with EAGLE-2 dynamic trees or chains
(:class:`~mmspec.drafters.eagle.EagleDrafter`); what differs between methods is what the head's own
KV cache holds for the image span of the prompt. The target is never changed, so decoding stays
lossless whatever the visual path.

Entries of the drafter cache (its *layout*). Text keeps EAGLE's pairing: an entry at sequence
position ``t`` reads ``(f_t, x_{t+1})`` -- the target feature of ``t`` and the embedding of the
token after it (the pair before an image therefore embeds the image placeholder token). An image
token ``i`` is an input and a state at one grid position, so image entries are position-aligned:
``(e_i, f_i)`` = the target's input embedding (the projected vision feature) and its output feature
at ``i``. A visual path maps a span's ``N`` image tokens to ``m`` entries, each placed at the
position of a *representative* image token (its sequence position orders the cache, its RoPE ids --
M-RoPE ``(t, h, w)`` for Qwen2-VL, from the target's own ``rope_positions`` -- rotate it). Text
after a span keeps its original positions, so drafts line up with the target's. Paths
(:data:`VISUAL_PATHS`):

- ``"none"``: text only, the image entries are dropped (baseline).
- ``"full"``: every image token is an entry (plain EAGLE-VLM; SpecVLM's "EagleVLM" baseline).
- ``"pool"``: average pooling over the span's token grid, window ``k x k`` when ``ratio = k^2`` and
  the grid has more than one row, else ``1 x ratio`` along rows; ``ceil(h/kh) * ceil(w/kw)``
  entries, each at its window's first (top-left) token. Grids: M-RoPE ``(h, w)`` ids (Qwen);
  LLaVA-1.5 runs of ``side^2`` tokens per image (``side`` = vision tower patches per side); any
  other span (LLaVA-NeXT's any-resolution tiles) is one row in sequence order.
- ``"prune"``: keeps the ``ceil(N / ratio)`` tokens with the largest target-feature L2 norm (a
  parameter-free saliency score; attention to the last text token would need the target's
  attention maps), at their own positions.
- ``"vispec"`` (ViSpec, Kang et al. 2025, arXiv 2509.15235): a vision adaptor -- learned queries
  cross-attending over the span's image *embeddings* -- whose ``m = min(num_queries, ceil(N /
  ratio))`` outputs replace the span; query ``j`` sits at the span token ``floor((j + 1/2) N / m)``
  (evenly spaced, raster order). A global feature per image (the mean of its adaptor outputs,
  projected) is added to the input of every later text entry (and of every generated token).
- ``"flash"`` (FLASH, Wang et al. 2025, arXiv 2505.12728): latent-aware compression -- learned
  queries over the span's target *features*, ``softmax(C F^T) F`` -- laid out as ViSpec's, and a
  semi-autoregressive head: one forward predicts the next ``tokens_per_step`` (default 2) features,
  the later ones through small lookahead MLPs on the first, so a chain of ``k`` drafts costs
  ``ceil(k / s)`` head forwards. Trees expand one level per forward (the lookahead is unused there).
- ``"specvlm"`` (SpecVLM, Huang et al. 2025, arXiv 2509.11815): an elastic compressor that chooses
  per image among pruning (the max-norm token of each pooling window), pooling, a learned strided
  depthwise convolution and a resampler (queries from the pooled windows cross-attending over the
  span). A learned gate on a global image statistic (the span's mean embedding) picks one: top-1
  at inference, straight-through Gumbel-softmax in training (as the paper). Every primitive emits
  the pooling layout, so the choice changes values, never positions.

In every attention-pooled entry (vispec, flash, resampler) the same weights pool both halves, so
an entry is an ``(embedding, feature)`` pair like the others.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from mmspec.drafters.eagle import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    EagleConfig,
    EagleDrafter,
    EagleHead,
    TreeConfig,
    _window_mask,
    target_fingerprint,
)
from mmspec.modeling import RMSNorm, rope_frequencies
from mmspec.sampling import sample_from_probs
from mmspec.types import Draft, DraftContext, PrefillOutput, Verdict

from .decoder import RopeOffsetKVCache
from .targets import VLMPrompt, VLMTarget

TREE_NAME = "tree.json"


@dataclass(frozen=True)
class VLMEagleConfig(EagleConfig):
    """An :class:`~mmspec.drafters.eagle.EagleConfig` plus the visual path and the target's
    multimodal conventions (all checked on loading).

    Args:
        visual_path: a key of :data:`VISUAL_PATHS`.
        ratio: token-count reduction of the compressing paths (pool, prune, vispec, flash, specvlm).
        num_queries: learned queries of vispec / flash (the most entries one image can get).
        tokens_per_step: drafts per head forward in chains (FLASH's semi-autoregressive head: 2).
        image_token_id: the target's image placeholder id.
        mrope_section: the head's M-RoPE split of its ``head_dim / 2`` frequency pairs into
            ``(t, h, w)`` sections, or None for 1-D RoPE targets.
    """

    visual_path: str = "full"
    ratio: int = 4
    num_queries: int = 64
    tokens_per_step: int = 1
    image_token_id: int = -1
    mrope_section: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.visual_path not in VISUAL_PATHS:
            raise ValueError(f"unknown visual path {self.visual_path!r}; available: {', '.join(VISUAL_PATHS)}")
        if self.ratio < 1 or self.num_queries < 1 or self.tokens_per_step < 1:
            raise ValueError(
                f"ratio, num_queries and tokens_per_step must be >= 1, got {self.ratio}, {self.num_queries}, "
                f"{self.tokens_per_step}"
            )
        if self.mrope_section is not None and sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim / 2 = {self.head_dim // 2}")


# --------------------------------------------------------------------------- image tokens


@dataclass
class ImageTokens:
    """Every image token of a batch that the drafter layout covers, flattened in (row, position)
    order (``n`` tokens, ``S`` spans = images, numbered in the same order).

    ``row``, ``position``: ``[n]`` batch row and sequence position. ``span``: ``[n]`` image index.
    ``grid``: ``[n, 2]`` (row, column) in the image's token grid (raster order within a span).
    ``rope``: ``[n, 3]`` the target's RoPE ids. ``embeds`` / ``features``: ``[n, H]`` the target's
    input embedding and output feature. ``span_row``, ``span_first``, ``span_size``: ``[S]`` each
    image's batch row, index of its first token and token count; ``span_grid``: ``[S, 2]`` grid size.
    """

    row: torch.Tensor
    position: torch.Tensor
    span: torch.Tensor
    grid: torch.Tensor
    rope: torch.Tensor
    embeds: torch.Tensor
    features: torch.Tensor
    span_row: torch.Tensor
    span_first: torch.Tensor
    span_size: torch.Tensor
    span_grid: torch.Tensor

    @property
    def num_spans(self) -> int:
        return self.span_size.shape[0]


@dataclass
class VisualEntries:
    """A visual path's output: ``m`` cache entries for the image spans.

    ``token``: ``[m]`` index (into :class:`ImageTokens`) of each entry's representative token, whose
    row, sequence position and RoPE ids the entry takes (increasing within a span).
    ``embeds`` / ``features``: ``[m, H]``. ``span_global``: ``[S, H]`` a global feature per image added
    to every later text entry (ViSpec), or None.
    """

    token: torch.Tensor
    embeds: torch.Tensor
    features: torch.Tensor
    span_global: torch.Tensor | None = None


def _segment_mean(values: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Mean of ``values [n, D]`` per segment id ``[n]`` -> ``[num_segments, D]`` (empty segments: 0)."""
    total = values.new_zeros(num_segments, values.shape[-1]).index_add_(0, segment, values)
    count = torch.bincount(segment, minlength=num_segments).clamp(min=1)
    return total / count[:, None].to(values.dtype)


def _span_attention(
    queries: torch.Tensor, entry_span: torch.Tensor, keys: torch.Tensor, image: ImageTokens
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every entry attends over its own image's tokens only: ``softmax(q . k / sqrt(H))`` pools
    both halves ``(e_i, f_i)``. ``queries [m, H]`` (entries grouped by span, in span order),
    ``entry_span [m]``, ``keys [n, H]`` -> ``(embeds, features)`` ``[m, H]`` each. Computed per
    image on padded blocks, so the cost is ``sum_s m_s N_s``, not ``m n``."""
    num_spans, hidden = image.num_spans, keys.shape[-1]
    if queries.shape[0] == 0:
        return image.embeds[:0], image.features[:0]
    width = int(image.span_size.max())  # deliberate sync: layout, once per prompt
    offsets = torch.arange(width, device=keys.device)
    inside = offsets[None] < image.span_size[:, None]  # [S, N]
    index = torch.where(inside, image.span_first[:, None] + offsets, 0)  # [S, N]
    count = torch.bincount(entry_span, minlength=num_spans)
    rank = torch.arange(entry_span.shape[0], device=keys.device) - (count.cumsum(0) - count)[entry_span]
    padded = queries.new_zeros(num_spans, int(count.max()), hidden)  # [S, m_max, H]
    padded[entry_span, rank] = queries
    scores = padded @ keys[index].transpose(1, 2) / math.sqrt(hidden)  # [S, m_max, N]
    weights = scores.masked_fill(~inside[:, None], float("-inf")).softmax(-1)
    pooled = (weights @ torch.cat([image.embeds, image.features], -1)[index])[entry_span, rank]  # [m, 2H]
    return pooled.split(hidden, -1)


def _window(ratio: int, image: ImageTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooling window ``(kh, kw)`` per span ``[S]`` each: ``k x k`` when ``ratio = k^2`` and the
    grid has more than one row, else ``1 x ratio``."""
    k = math.isqrt(ratio)
    two_d = (image.span_grid[:, 0] > 1) & (k * k == ratio)
    return torch.where(two_d, k, 1), torch.where(two_d, k, ratio)


@dataclass
class PoolCells:
    """The pooling windows of a batch's image tokens (``m`` cells, raster order per span).

    ``cell``: ``[n]`` each token's cell. ``first``: ``[m]`` each cell's first (top-left) token.
    ``offset``: ``[n]`` each token's place in its window, ``[0, ratio)``.
    """

    cell: torch.Tensor
    first: torch.Tensor
    offset: torch.Tensor

    @property
    def num_cells(self) -> int:
        return self.first.shape[0]

    @classmethod
    def of(cls, image: ImageTokens, ratio: int) -> "PoolCells":
        kh, kw = (k[image.span] for k in _window(ratio, image))  # [n]
        row, col = image.grid.unbind(-1)
        width = int(image.span_grid.max()) + 1 if image.num_spans else 1  # deliberate sync: layout, once per prompt
        key = (image.span * width + row // kh) * width + col // kw  # sorts span-major, then raster
        _, cell = torch.unique(key, return_inverse=True)
        num_cells = int(cell.max()) + 1 if cell.numel() else 0
        index = torch.arange(cell.shape[0], device=cell.device)
        first = torch.full((num_cells,), cell.shape[0], device=cell.device).scatter_reduce(0, cell, index, "amin")
        return cls(cell, first, (row % kh) * kw + col % kw)


class VisualPath(nn.Module):
    """Maps a batch's image tokens to drafter cache entries (see the module docstring)."""

    def __init__(self, config: VLMEagleConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, image: ImageTokens) -> VisualEntries:
        raise NotImplementedError


class NoVisual(VisualPath):
    """Text-only drafter: the image spans leave no entry."""

    def forward(self, image: ImageTokens) -> VisualEntries:
        none = image.row[:0]
        return VisualEntries(none, image.embeds[:0], image.features[:0])


class FullVisual(VisualPath):
    """EAGLE-VLM: every image token is an entry."""

    def forward(self, image: ImageTokens) -> VisualEntries:
        return VisualEntries(torch.arange(image.row.shape[0], device=image.row.device), image.embeds, image.features)


class PoolVisual(VisualPath):
    """Average pooling over each image's token grid (``ratio`` tokens per window)."""

    def forward(self, image: ImageTokens) -> VisualEntries:
        cells = PoolCells.of(image, self.config.ratio)
        return VisualEntries(
            cells.first,
            _segment_mean(image.embeds, cells.cell, cells.num_cells),
            _segment_mean(image.features, cells.cell, cells.num_cells),
        )


class PruneVisual(VisualPath):
    """Keep the ``ceil(N / ratio)`` tokens of each image with the largest feature norm."""

    def forward(self, image: ImageTokens) -> VisualEntries:
        n = image.row.shape[0]
        keep_count = -(-image.span_size // self.config.ratio)  # [S] ceil
        by_norm = torch.argsort(image.features.norm(dim=-1), descending=True, stable=True)
        order = by_norm[torch.argsort(image.span[by_norm], stable=True)]  # per span, largest norm first
        rank = torch.empty_like(order)
        rank[order] = torch.arange(n, device=order.device) - image.span_first[image.span[order]]
        kept = torch.nonzero(rank < keep_count[image.span]).squeeze(1)  # sequence order
        return VisualEntries(kept, image.embeds[kept], image.features[kept])


class QueryVisual(VisualPath):
    """Learned queries cross-attending over one half of each image's tokens (ViSpec's vision
    adaptor over embeddings, FLASH's latent-aware compression over features): query ``j`` of a span
    scores token ``i`` by ``q_j . norm(x_i) / sqrt(H)`` and pools ``(e_i, f_i)`` with those weights.

    Args:
        config: sizes (``num_queries``, ``ratio``).
        source: ``"embeds"`` (ViSpec) or ``"features"`` (FLASH).
        global_feature: add ViSpec's per-image global feature (mean of the outputs, projected;
            the projection starts at zero, so an untrained adaptor adds nothing).
    """

    def __init__(self, config: VLMEagleConfig, source: str, global_feature: bool) -> None:
        super().__init__(config)
        hidden = config.hidden_size
        self.source = source
        self.queries = nn.Parameter(torch.randn(config.num_queries, hidden))
        self.key_norm = RMSNorm(hidden, config.norm_eps)
        self.global_proj = nn.Linear(hidden, hidden) if global_feature else None
        if self.global_proj is not None:
            nn.init.zeros_(self.global_proj.weight)
            nn.init.zeros_(self.global_proj.bias)

    def forward(self, image: ImageTokens) -> VisualEntries:
        device = image.row.device
        count = torch.minimum(-(-image.span_size // self.config.ratio), torch.full_like(image.span_size, self.config.num_queries))
        span = torch.repeat_interleave(torch.arange(image.num_spans, device=device), count)  # [m]
        j = torch.arange(span.shape[0], device=device) - (count.cumsum(0) - count)[span]  # query index in its span
        token = image.span_first[span] + ((2 * j + 1) * image.span_size[span]) // (2 * count[span])
        embeds, features = _span_attention(self.queries[j], span, self.key_norm(getattr(image, self.source)), image)
        span_global = None
        if self.global_proj is not None:
            span_global = self.global_proj(_segment_mean(embeds, span, image.num_spans))  # [S, H]
        return VisualEntries(token, embeds, features, span_global)


class ElasticVisual(VisualPath):
    """SpecVLM's elastic compressor: a gate picks one primitive per image (pool / prune / conv /
    resampler), all laid out on the pooling windows. Ties (e.g. the zero-initialised gate) pick pooling."""

    PRIMITIVES = ("pool", "prune", "conv", "resampler")

    def __init__(self, config: VLMEagleConfig) -> None:
        super().__init__(config)
        hidden = config.hidden_size
        self.gate = nn.Linear(hidden, len(self.PRIMITIVES))
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.conv = nn.Parameter(torch.ones(config.ratio, 2 * hidden))  # depthwise taps, [window offset, e|f]
        self.resampler_query = nn.Linear(hidden, hidden, bias=False)
        self.key_norm = RMSNorm(hidden, config.norm_eps)

    def forward(self, image: ImageTokens) -> VisualEntries:
        cells = PoolCells.of(image, self.config.ratio)
        hidden, n = image.embeds.shape[-1], image.embeds.shape[0]
        both = torch.cat([image.embeds, image.features], -1)  # [n, 2H]
        pooled = _segment_mean(both, cells.cell, cells.num_cells)  # [m, 2H]
        norm = image.features.norm(dim=-1)  # [n]
        best = norm.new_full((cells.num_cells,), float("-inf")).scatter_reduce(0, cells.cell, norm, "amax")
        candidates = torch.where(norm == best[cells.cell], torch.arange(n, device=norm.device), n)
        winner = torch.full_like(cells.first, n).scatter_reduce(0, cells.cell, candidates, "amin")  # [m] max-norm token
        conv = _segment_mean(both * self.conv[cells.offset], cells.cell, cells.num_cells)
        cell_span = image.span[cells.first]  # [m]
        queries = self.resampler_query(pooled[:, :hidden])
        resampled = torch.cat(_span_attention(queries, cell_span, self.key_norm(image.embeds), image), -1)
        options = torch.stack([pooled, both[winner], conv, resampled])  # [4, m, 2H], PRIMITIVES order
        logits = self.gate(_segment_mean(image.embeds, image.span, image.num_spans))  # [S, 4]
        choice = (
            F.gumbel_softmax(logits, tau=1.0, hard=True)  # straight-through: one-hot forward, soft gradient
            if self.training
            else F.one_hot(logits.argmax(-1), len(self.PRIMITIVES)).to(logits.dtype)
        )
        chosen = torch.einsum("mk,kmd->md", choice[cell_span], options)
        embeds, features = chosen.split(hidden, -1)
        return VisualEntries(cells.first, embeds, features)


#: ``visual_path`` name -> the module that builds its entries.
VISUAL_PATHS: dict[str, Callable[[VLMEagleConfig], VisualPath]] = {
    "none": NoVisual,
    "full": FullVisual,
    "pool": PoolVisual,
    "prune": PruneVisual,
    "vispec": lambda config: QueryVisual(config, source="embeds", global_feature=True),
    "flash": lambda config: QueryVisual(config, source="features", global_feature=False),
    "specvlm": ElasticVisual,
}

#: Defaults a visual path brings to :meth:`VLMEagleHead.for_target` (FLASH: its semi-AR head).
PATH_DEFAULTS: dict[str, dict] = {"flash": {"tokens_per_step": 2}}


# --------------------------------------------------------------------------- sequences and layouts


@dataclass
class SequencePairs:
    """A batch of sequences as EAGLE pairs by sequence position ``t`` (``S`` positions per row).

    ``next_tokens``: ``[B, S]`` ``x_{t+1}``. ``features``: ``[B, S, H]`` ``f_t``. ``rope``: ``[3, B, S]``
    the target's RoPE ids of ``t``. ``num_pairs``: ``[B]`` pairs ``t < num_pairs`` enter the layout.
    ``rope_offsets``: ``[B]`` RoPE id minus sequence position of the text after the prompt (M-RoPE
    deltas; zero for 1-D RoPE). ``image``: the prompt's image tokens (excluded from the text pairs).
    Training only: ``target_features`` ``[B, S, H]`` ``f_{t+1}`` and ``valid`` ``[B, S]`` the pairs
    with a loss target.
    """

    next_tokens: torch.Tensor
    features: torch.Tensor
    rope: torch.Tensor
    num_pairs: torch.Tensor
    rope_offsets: torch.Tensor
    image: ImageTokens
    is_image: torch.Tensor
    target_features: torch.Tensor | None = None
    valid: torch.Tensor | None = None


@dataclass
class DrafterLayout:
    """What the drafter cache holds for a batch of sequences: ``M`` entries per row (padded).

    ``embeds`` / ``features``: ``[B, M, H]``. ``rope``: ``[3, B, M]`` RoPE ids. ``bias``: ``[B, M, H]``
    ViSpec's global image features added to text entries, or None. ``source``: ``[B, M]`` the
    sequence position ``t`` of text entries (-1: image entry or padding). ``lengths``: ``[B]``
    entries per row. ``text_bias``: ``[B, H]`` the bias of text after the prompt (all its images).
    """

    embeds: torch.Tensor
    features: torch.Tensor
    rope: torch.Tensor
    bias: torch.Tensor | None
    source: torch.Tensor
    lengths: torch.Tensor
    text_bias: torch.Tensor


#: HF ``model_type`` -> tokens per side of one image's square token grid, for 1-D RoPE families
#: whose images are plain patch grids (M-RoPE families read their grids off the RoPE ids).
SQUARE_GRID_SIDE: dict[str, Callable[[object], int]] = {
    "llava": lambda config: config.vision_config.image_size // config.vision_config.patch_size,
}


def _image_tokens(
    target: VLMTarget, prompt: VLMPrompt, is_image: torch.Tensor, features: torch.Tensor, rope: torch.Tensor,
    dtype: torch.dtype,
) -> ImageTokens:
    """Collect the image tokens ``is_image [B, S]`` (grids from M-RoPE ids, or square LLaVA-1.5
    images, else one row per run of image tokens)."""
    device = is_image.device
    width = prompt.tokens.shape[1]
    in_prompt = (prompt.tokens == target.image_token_id) & (
        torch.arange(width, device=device)[None] < prompt.lengths[:, None]
    )  # [B, P]: the rows of prompt.image_features, in order
    embed_index = in_prompt.flatten().cumsum(0).view_as(in_prompt) - 1
    row, position = torch.nonzero(is_image, as_tuple=True)  # deliberate sync: once per prompt / training step
    n = row.shape[0]
    image_features = prompt.image_features if n == 0 or prompt.image_features is not None else target.encode_images(prompt).image_features
    embeds = image_features[embed_index[row, position]] if n else features.new_zeros(0, features.shape[-1])
    ids = rope[:, row, position].T  # [n, 3]
    new_run = torch.ones(n, dtype=torch.bool, device=device)
    new_run[1:] = (row[1:] != row[:-1]) | (position[1:] != position[:-1] + 1)
    run = new_run.cumsum(0) - 1
    run_first = torch.nonzero(new_run).squeeze(1)
    j = torch.arange(n, device=device) - run_first[run]  # index within the run
    if target.decoder.config.mrope_section is not None:  # M-RoPE: the (h, w) ids are the grid
        starts = torch.full((run_first.shape[0], 2), 1 << 30, device=device).scatter_reduce(
            0, run[:, None].expand(-1, 2), ids[:, 1:], "amin"
        )
        grid, new_span = ids[:, 1:] - starts[run], new_run
    else:
        side = SQUARE_GRID_SIDE.get(target.config.model_type, lambda config: 0)(target.config)
        per_image = max(side * side, 1)
        square = (torch.bincount(run)[run] % per_image == 0) & (side > 0)  # [n] the run is whole square images
        k = torch.where(square, j % per_image, j)
        grid = torch.stack([torch.where(square, k // max(side, 1), 0), torch.where(square, k % max(side, 1), k)], -1)
        new_span = new_run | (square & (k == 0))
    span = new_span.cumsum(0) - 1
    span_first = torch.nonzero(new_span).squeeze(1)
    num_spans = span_first.shape[0]
    span_grid = torch.zeros(num_spans, 2, dtype=torch.long, device=device).scatter_reduce(
        0, span[:, None].expand(-1, 2), grid + 1, "amax"
    )
    return ImageTokens(
        row=row, position=position, span=span, grid=grid, rope=ids, embeds=embeds.to(dtype),
        features=features[row, position].to(dtype), span_row=row[span_first], span_first=span_first,
        span_size=torch.bincount(span, minlength=num_spans), span_grid=span_grid,
    )


def _rope_ids(target: VLMTarget, prompt: VLMPrompt, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's RoPE ids ``[3, B, width]`` for the prompt and the text after it, and each
    row's offset ``[B]`` (1-D RoPE: three equal rows)."""
    positions, offsets = target.rope_positions(prompt)  # [B, P] or [3, B, P], [B]
    positions = positions.expand(3, -1, -1) if positions.dim() == 2 else positions
    s = torch.arange(width, device=positions.device)
    after = (s[None] + offsets[:, None]).expand(3, -1, -1)  # [3, B, width]
    prompt_ids = F.pad(positions, (0, width - positions.shape[-1]))
    inside = s[None] < prompt.lengths[:, None]
    return torch.where(inside, prompt_ids, after), offsets


def sequence_pairs(
    target: VLMTarget,
    prompt: VLMPrompt,
    next_tokens: torch.Tensor,
    features: torch.Tensor,
    num_pairs: torch.Tensor,
    dtype: torch.dtype,
    target_features: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> SequencePairs:
    """Sequences that start with ``prompt`` as EAGLE pairs: ``next_tokens [B, S]`` (``x_{t+1}``),
    ``features [B, S, H]`` (``f_t``), pairs ``t < num_pairs [B]``; the prompt's image tokens among
    them are the visual path's (``dtype``: the head's)."""
    width = next_tokens.shape[1]
    device = next_tokens.device
    rope, offsets = _rope_ids(target, prompt, width)
    tokens = F.pad(prompt.tokens.to(device), (0, width - prompt.tokens.shape[1]), value=-1)[:, :width]
    is_image = (tokens == target.image_token_id) & (torch.arange(width, device=device)[None] < num_pairs[:, None])
    return SequencePairs(
        next_tokens=next_tokens, features=features, rope=rope, num_pairs=num_pairs, rope_offsets=offsets,
        image=_image_tokens(target, prompt, is_image, features, rope, dtype), is_image=is_image,
        target_features=target_features, valid=valid,
    )


def prompt_sequence(target: VLMTarget, prompt: VLMPrompt, features: torch.Tensor, dtype: torch.dtype) -> SequencePairs:
    """The prompt's pairs ``t < L - 1`` (the last one is the drafter's first catch-up) from the
    prefill features ``[B, P, H]``."""
    tokens = prompt.tokens.to(features.device)
    next_tokens = F.pad(tokens[:, 1:], (0, 1))
    return sequence_pairs(target, prompt, next_tokens, features, prompt.lengths.to(features.device) - 1, dtype)


def lay_out(head: "VLMEagleHead", seq: SequencePairs) -> DrafterLayout:
    """Merge the text pairs and the visual path's image entries of every row by sequence position
    (a row's entries fill slots ``0 .. lengths - 1``)."""
    batch, width = seq.next_tokens.shape
    device = seq.next_tokens.device
    dtype = head.fc.weight.dtype
    image = seq.image
    entries = head.visual(image)
    text = (torch.arange(width, device=device)[None] < seq.num_pairs[:, None]) & ~seq.is_image  # [B, S]
    text_row, text_pos = torch.nonzero(text, as_tuple=True)
    row = torch.cat([text_row, image.row[entries.token]])  # [E] every entry's row
    key = torch.cat([text_pos, image.position[entries.token]])  # [E] its sequence position
    order = torch.argsort(row * (width + 1) + key)
    lengths = torch.bincount(row, minlength=batch)  # [B]
    slot = torch.empty_like(order)
    slot[order] = torch.arange(order.shape[0], device=device) - (lengths.cumsum(0) - lengths)[row[order]]
    num_slots = int(lengths.max()) if batch else 0  # deliberate sync: layout, once per prompt
    token_embeds = F.embedding(seq.next_tokens[text_row, text_pos].clamp(min=0), head.target_modules.embed.weight.detach())

    def scatter(text_values: torch.Tensor, image_values: torch.Tensor) -> torch.Tensor:
        values = torch.cat([text_values.to(dtype), image_values.to(dtype)])  # [E, H]
        out = values.new_zeros(batch, num_slots, values.shape[-1])
        out[row, slot] = values
        return out

    rope = torch.zeros(3, batch, num_slots, dtype=torch.long, device=device)
    rope[:, row, slot] = torch.cat([seq.rope[:, text_row, text_pos], image.rope[entries.token].T], 1)
    source = torch.full((batch, num_slots), -1, dtype=torch.long, device=device)
    source[text_row, slot[: text_row.shape[0]]] = text_pos
    bias, text_bias = None, torch.zeros(batch, head.config.hidden_size, dtype=dtype, device=device)
    if entries.span_global is not None and image.num_spans:
        glob = entries.span_global.to(dtype)  # [S, H]
        text_bias = text_bias.index_add(0, image.span_row, glob)  # every image of the row
        # A text entry gets the features of its row's images that start before it: a per-row
        # running sum, indexed by the last such image (spans are in (row, position) order).
        running = glob.cumsum(0) - (text_bias.cumsum(0) - text_bias)[image.span_row]  # [S, H]
        span_key = image.span_row * (width + 1) + image.position[image.span_first]
        last = torch.searchsorted(span_key, text_row * (width + 1) + text_pos) - 1  # [T]
        own = (last >= 0) & (image.span_row[last.clamp(min=0)] == text_row)
        text_values = torch.where(own[:, None], running[last.clamp(min=0)], 0)
        bias = scatter(text_values, torch.zeros_like(entries.embeds))  # [B, M, H]
    return DrafterLayout(
        embeds=scatter(token_embeds, entries.embeds), features=scatter(seq.features[text_row, text_pos], entries.features),
        rope=rope, bias=bias, source=source, lengths=lengths, text_bias=text_bias,
    )


# --------------------------------------------------------------------------- head and drafter


class VisualDraftCache(RopeOffsetKVCache):
    """The head's one-layer cache plus what describes its compressed sequence, per row:
    ``slot_offsets [B]`` (sequence position - cache slot of the text after the prompt),
    ``rope_offsets [B]`` (RoPE id - cache slot of that text: ``slot_offsets`` + the target's M-RoPE
    delta) and ``text_bias [B, H]`` (ViSpec's global image features, added to every later text input)."""

    def __init__(self, *args, hidden_size: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.slot_offsets = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        self.text_bias = torch.zeros(self.batch_size, hidden_size, dtype=self.k.dtype, device=self.device)

    def reset(self) -> None:
        super().reset()
        self.slot_offsets.zero_()
        self.text_bias.zero_()


class Lookahead(nn.Module):
    """FLASH's semi-autoregressive extra output: ``f_{t+1+j} ~ x + W2 silu(W1 norm(x))`` from the
    head's prediction ``x = f_{t+1}`` (``W2`` starts at zero: a copy of ``x``)."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(hidden, eps)
        self.w1 = nn.Linear(hidden, hidden)
        self.w2 = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.w2.weight)
        nn.init.zeros_(self.w2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w2(F.silu(self.w1(self.norm(x))))


class VLMEagleHead(EagleHead):
    """An :class:`~mmspec.drafters.eagle.EagleHead` with a visual path, M-RoPE and FLASH's lookahead.

    ``forward`` keeps the EAGLE drafter's call (token ids, features, slot-numbered positions) and
    maps slots to RoPE ids and text biases through the :class:`VisualDraftCache`; prompt entries
    with arbitrary input embeddings and RoPE ids go through :meth:`forward_inputs`.
    """

    def __init__(self, config: VLMEagleConfig, embed: nn.Embedding, lm_head: nn.Linear) -> None:
        super().__init__(config, embed, lm_head)
        self.visual = VISUAL_PATHS[config.visual_path](config)
        self.lookahead = nn.ModuleList(Lookahead(config.hidden_size, config.norm_eps) for _ in range(config.tokens_per_step - 1))
        sections = config.mrope_section or (config.head_dim // 2,)
        component = torch.tensor([i % 3 for i, size in enumerate(sections) for _ in range(size)])
        self.register_buffer("rope_component", component, persistent=False)  # [D/2] t/h/w of each pair

    @classmethod
    def for_target(cls, target: VLMTarget, visual_path: str = "full", n_head: int | None = None, **options) -> "VLMEagleHead":
        """A fresh head for ``target`` (named by :func:`~mmspec.drafters.eagle.target_fingerprint`).

        ``options``: further :class:`VLMEagleConfig` fields (``ratio``, ``num_queries``,
        ``tokens_per_step``, ...) over the path's :data:`PATH_DEFAULTS`.
        """
        decoder = target.decoder
        n_head = n_head or decoder.config.n_head
        head_dim = decoder.config.dim // n_head
        sections = decoder.config.mrope_section
        if sections is not None:  # scale the target's t/h/w split to the head's width
            scaled = [round(s * (head_dim // 2) / sum(sections)) for s in sections[:-1]]
            sections = (*scaled, head_dim // 2 - sum(scaled))
        config = VLMEagleConfig(
            hidden_size=decoder.config.dim, n_head=n_head, vocab_size=decoder.vocab_size,
            target_name=target_fingerprint(decoder.output), norm_eps=decoder.config.norm_eps, visual_path=visual_path,
            image_token_id=target.image_token_id, mrope_section=sections,
            **{**PATH_DEFAULTS.get(visual_path, {}), **options},
        )
        return cls(config, decoder.tok_embeddings, decoder.output).to(target.device)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        tokens: torch.Tensor,  # [B, T] x_{t+1}
        features: torch.Tensor,  # [B, T, H] f_t
        positions: torch.Tensor,  # [B, T] cache slots (the EAGLE drafter's positions)
        cache: VisualDraftCache,
        slots: torch.Tensor,  # [B, T]
        attn_mask: torch.Tensor,  # [B, 1, T, S]
    ) -> torch.Tensor:
        """Predicted features ``[B, T, H]`` of text pairs after the prompt."""
        embeds = F.embedding(tokens, self.target_modules.embed.weight.detach())
        rope = positions + cache.rope_offsets[:, None]
        return self.forward_inputs(embeds, features, rope, cache, slots, attn_mask, cache.text_bias[:, None])

    def forward_inputs(
        self,
        embeds: torch.Tensor,  # [B, T, H] input embeddings (token or image)
        features: torch.Tensor,  # [B, T, H]
        rope: torch.Tensor,  # [B, T] (t = h = w) or [3, B, T] RoPE ids
        cache: VisualDraftCache,
        slots: torch.Tensor,  # [B, T]
        attn_mask: torch.Tensor,  # [B, 1, T, S]
        bias: torch.Tensor | None = None,  # [B, T or 1, H] added after fc (ViSpec's global feature)
    ) -> torch.Tensor:
        """``Block(fc([e ; f]) + bias)`` at RoPE ids ``rope`` -> predicted next features ``[B, T, H]``."""
        dtype = self.fc.weight.dtype
        x = self.fc(torch.cat([embeds.to(dtype), features.to(dtype)], dim=-1))
        if bias is not None:
            x = x + bias.to(dtype)
        return self.block(x, self._rope(rope), cache, 0, slots, attn_mask)

    def lookahead_features(self, feature: torch.Tensor) -> torch.Tensor:
        """``[B, H]`` prediction ``f_{t+1}`` -> ``[B, s, H]`` the semi-AR predictions ``f_{t+1} .. f_{t+s}``."""
        return torch.stack([feature] + [module(feature) for module in self.lookahead], 1)

    def _rope(self, rope: torch.Tensor) -> torch.Tensor:
        """Rotary table ``[B, T, D/2, 2]``: pair ``i`` turns by the id of its M-RoPE component."""
        freqs = rope_frequencies(rope, self.config.head_dim, self.config.rope_base)
        if rope.dim() == 2:
            return freqs
        pairs = torch.arange(self.rope_component.shape[0], device=rope.device)
        return freqs[self.rope_component, :, :, pairs].permute(1, 2, 0, 3)  # [3, B, T, D/2, 2] -> [B, T, D/2, 2]

    def new_cache(self, batch_size: int, max_seq_len: int, groups: int = 1) -> VisualDraftCache:
        """An empty one-layer cache (VLMs have no classifier-free guidance: ``groups`` must be 1)."""
        if groups != 1:
            raise ValueError("a VLM drafter has no unconditional branch: classifier-free guidance is not available")
        weight = self.fc.weight
        return VisualDraftCache(
            1, batch_size, self.config.n_head, max_seq_len, self.config.head_dim,
            dtype=weight.dtype, device=weight.device, hidden_size=self.config.hidden_size,
        )

    # ------------------------------------------------------------------ save / load
    @classmethod
    def from_pretrained(cls, directory: str | Path, target: VLMTarget, visual_path: str | None = None) -> "VLMEagleHead":
        """Load a head saved by ``save_pretrained`` for ``target``; ``ValueError`` if it was trained
        for another target (LM-head fingerprint, image token, RoPE kind) or, when ``visual_path`` is
        given, uses another visual path."""
        directory = Path(directory)
        saved = json.loads((directory / CONFIG_NAME).read_text())
        if saved.get("mrope_section") is not None:
            saved["mrope_section"] = tuple(saved["mrope_section"])
        config = VLMEagleConfig(**saved)
        checks = {  # name -> (saved, this target's)
            "target_name": (config.target_name, target_fingerprint(target.decoder.output)),
            "image_token_id": (config.image_token_id, target.image_token_id),
            "vocab_size": (config.vocab_size, target.vocab_size),
            "hidden_size": (config.hidden_size, target.decoder.config.dim),
            "M-RoPE": (config.mrope_section is not None, target.decoder.config.mrope_section is not None),
        }
        differ = [f"{name} {saved!r} (this target: {wanted!r})" for name, (saved, wanted) in checks.items() if saved != wanted]
        if differ:
            raise ValueError(
                f"the VLM drafter in {directory} was trained for another target: {', '.join(differ)}; train one for "
                "this target (mmspec train-drafter --target-kind vlm)"
            )
        if visual_path is not None and visual_path != config.visual_path:
            raise ValueError(
                f"the VLM drafter in {directory} uses visual path {config.visual_path!r}, not {visual_path!r}"
            )
        head = cls(config, target.decoder.tok_embeddings, target.decoder.output)
        head.load_state_dict(load_file(directory / WEIGHTS_NAME))
        return head.to(target.device)


class VLMEagleDrafter(EagleDrafter):
    """EAGLE / EAGLE-2 drafting for a VLM target through a :class:`VLMEagleHead`'s visual path.

    Args:
        head: the head (shares the target's embedding and LM head).
        target: the VLM it drafts for: its RoPE ids (M-RoPE) and image features lay out the prompt.
        tree: None for chains; a :class:`~mmspec.drafters.eagle.TreeConfig` for EAGLE-2 dynamic trees.

    The cache holds the prompt's layout (:func:`lay_out`), then one entry per committed text token:
    slot ``s`` of the text after the prompt is sequence position ``s + slot_offsets``, so everything
    the EAGLE drafter does by slot (catch-up, chains, trees, rollback) carries over, with RoPE ids
    and biases supplied by the cache.
    """

    def __init__(self, head: VLMEagleHead, target: VLMTarget, tree: TreeConfig | None = None) -> None:
        super().__init__(head, tree)
        self.target = target

    def prefill(self, ctx: DraftContext, prompt: VLMPrompt, prefill: PrefillOutput) -> None:
        """Lay the prompt out through the visual path and run it into a fresh cache."""
        if prefill.hidden_states_all is None:
            raise ValueError("the VLM drafter needs the target's prompt features: PrefillOutput.hidden_states_all is None")
        seq = prompt_sequence(self.target, prompt, prefill.hidden_states_all, self.head.fc.weight.dtype)
        layout = lay_out(self.head, seq)
        tree_slots = 0 if self.tree is None else self.tree.window + self.tree.depth
        capacity = layout.embeds.shape[1] + 2 * ctx.history.shape[1] + tree_slots + 2
        self.cache = self.head.new_cache(len(seq.num_pairs), capacity)
        slots = self.cache.slots(layout.embeds.shape[1])
        self.head.forward_inputs(
            layout.embeds, layout.features, layout.rope, self.cache, slots, self.cache.attention_mask(slots), layout.bias
        )
        self.cache.commit(layout.lengths)
        self.cache.slot_offsets.copy_(seq.num_pairs - layout.lengths)
        self.cache.rope_offsets.copy_(self.cache.slot_offsets + seq.rope_offsets)
        self.cache.text_bias.copy_(layout.text_bias)

    def commit(self, ctx: DraftContext, verdict: Verdict) -> None:
        """Keep the target-feature pairs before the last step's ``num_new`` (in slots)."""
        self.cache.rollback(ctx.positions - ctx.num_new - self.cache.slot_offsets)

    def _draft_chain(self, ctx, feature, logits, num_draft_tokens, generator) -> Draft:
        """Chains; with a semi-autoregressive head (FLASH, ``tokens_per_step = s > 1``) each head
        forward proposes ``s`` tokens: ``f_{t+1}`` and its lookahead predictions, then the ``s``
        pairs run together to predict the next group."""
        steps = self.head.config.tokens_per_step
        if steps == 1:
            return super()._draft_chain(ctx, feature, logits, num_draft_tokens, generator)
        base = self.cache.lengths  # [B] slot of the first draft's pair
        causal = torch.ones(num_draft_tokens, num_draft_tokens, dtype=torch.bool, device=base.device).tril()
        tokens, probs = [], []
        while True:
            group = self.head.lookahead_features(feature)  # [B, s, H]
            for j in range(min(steps, num_draft_tokens - len(tokens))):
                q = self._probs(self.head.logits(group[:, j]), ctx.sampling)  # [B, V]
                tokens.append(q.argmax(-1) if ctx.sampling.greedy else sample_from_probs(q, generator))
                probs.append(q)
            if len(tokens) == num_draft_tokens:
                break
            start = len(tokens) - steps
            slots = base[:, None] + torch.arange(start, len(tokens), device=base.device)  # [B, s]
            mask = _window_mask(self.cache, causal[start : len(tokens)].expand(len(base), -1, -1))
            feature = self.head(torch.stack(tokens[start:], 1), group, slots, self.cache, slots, mask)[:, -1]
        draft_probs = None if ctx.sampling.greedy else torch.stack(probs, 1)  # [B, k, V]
        return Draft(tokens=torch.stack(tokens, 1), draft_probs=draft_probs)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path) -> None:
        """The head (weights + config naming its target and visual path) and the tree budget."""
        self.head.save_pretrained(directory)
        if self.tree is not None:
            (Path(directory) / TREE_NAME).write_text(json.dumps(asdict(self.tree)))

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, target: VLMTarget, visual_path: str | None = None, tree: TreeConfig | None = None
    ) -> "VLMEagleDrafter":
        """Load a drafter for ``target`` (see :meth:`VLMEagleHead.from_pretrained` for the checks);
        ``tree`` overrides the saved tree budget."""
        head = VLMEagleHead.from_pretrained(directory, target, visual_path)
        tree_file = Path(directory) / TREE_NAME
        if tree is None and tree_file.is_file():
            tree = TreeConfig(**json.loads(tree_file.read_text()))
        return cls(head.eval(), target, tree)

