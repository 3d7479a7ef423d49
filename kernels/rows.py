"""Whole-row gathers along dim 1, by ``index_select`` on the flattened batch.

``x.gather(1, index[..., None].expand(-1, -1, D))`` reads whole rows of ``x [B, R, D]``, but an
element-wise gather walks an index as large as its output: on the CPU, at D = 16,384 (LlamaGen's
vocabulary), it costs 6-24x an ``index_select`` of the same rows (``benchmarks/row_reads.py``;
benchmarks/RESULTS.md, "Seventh stop"). Speculative steps read rows of ``[B, k + 1, V]`` distributions
every step.
"""

import torch

__all__ = ["gather_rows"]


def gather_rows(
    x,  # [B, R, ...]
    index,  # [B] or [B, S] int64, in [0, R)
):
    """``out[b] = x[b, index[b]]`` (``index [B]`` → ``[B, ...]``) or ``out[b, s] = x[b, index[b, s]]``
    (``index [B, S]`` → ``[B, S, ...]``): the same values as ``x.gather(1, ...)`` with the index expanded
    over the trailing dims. Indices are trusted to be in range, as in the kernels (checking them would
    need a host sync): past a row's end reads the next row's first rows; only past the last row's end
    does ``index_select`` refuse (an error on the CPU, a device assert on CUDA)."""
    batch, num_rows = x.shape[:2]
    if batch > 1:  # row b of the flattened batch starts at b * R
        first = torch.arange(0, batch * num_rows, num_rows, device=index.device)
        index = index + (first if index.dim() == 1 else first[:, None])
    rows = x.flatten(0, 1).index_select(0, index.flatten())
    return rows.view(*index.shape, *x.shape[2:])
