"""Operations on 2-D grids of elements (token grids of AR image models), used by local
acceptance rules and local repair (MuLo-SD): window pooling, dilation, connected regions and
their raster-order schedules. Torch only; vectorised over rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

POOLS = ("mean", "max")


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
