"""The visual paths of the vision-aware EAGLE drafters (:mod:`~mmspec.pipelines.vlm.drafters`):
what the drafter cache keeps of each image span (none, full, pool, prune, vispec, flash, specvlm),
with the head configuration that names them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmspec.drafters.eagle import EagleConfig
from mmspec.modeling import RMSNorm


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
    def of(cls, image: ImageTokens, ratio: int) -> PoolCells:
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
        count = torch.minimum(
            -(-image.span_size // self.config.ratio), torch.full_like(image.span_size, self.config.num_queries)
        )
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

#: Defaults a visual path brings to :meth:`~mmspec.pipelines.vlm.drafters.VLMEagleHead.for_target` (FLASH: its semi-AR head).
PATH_DEFAULTS: dict[str, dict] = {"flash": {"tokens_per_step": 2}}
