"""Neighbourhood masses for relaxed acceptance: LANTERN's latent-neighbour mass and GSD's group mass.

Each op comes in four parts, as in :mod:`.rejection`: ``<op>_kernel`` (``@triton.jit``, one program
per row), ``<op>_triton`` (its launcher), ``<op>_ref`` (PyTorch, vectorised over rows, any device)
and ``<op>`` (dispatcher: Triton for CUDA inputs when triton imports, else the reference;
``MMSPEC_DISABLE_TRITON=1`` forces the reference).

* :func:`lantern_neighbour_mass` — LANTERN (Jang et al. 2024, arXiv 2410.03355, the set
  ``A_{k,delta}(x)``): for a draft token ``x`` with latent neighbours ``n_1, n_2, ...`` (nearest
  first), the largest prefix sum ``S = p(n_1) + ... + p(n_j)`` that stays within a budget:
  ``S <= delta`` (TVD mode) or ``S <= (lambda - 1) * p(x)`` (LANTERN++, Park et al. 2025,
  arXiv 2502.06352).
* :func:`gsd_group_mass` — GSD (So et al. 2025, arXiv 2508.07747, dynamic GSD): which of a draft
  token's group candidates pass the probability and embedding-distance filters, and the group's
  target and draft masses ``sum_G p`` and ``sum_G q``.

Numerics: prefix sums and group sums are accumulated in float64 (float32 on MPS), as in
:mod:`.rejection`, so that a blockwise Triton scan and ``torch.cumsum`` take the same prefix; scalar
budgets and thresholds are rounded to float32 first (Triton passes Python floats as float32).
Token ids, neighbour ids and candidate ids are trusted to be in range: checking would need a host
sync.
"""

import torch

from .rejection import HAS_TRITON, _accumulation_dtype, _require_triton, _shape_error, _use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = [
    "gsd_group_mass",
    "gsd_group_mass_ref",
    "gsd_group_mass_triton",
    "lantern_neighbour_mass",
    "lantern_neighbour_mass_ref",
    "lantern_neighbour_mass_triton",
]


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_neighbour_mass(probs, tokens, neighbours, budget):
    """Validates :func:`lantern_neighbour_mass`'s arguments and returns ``(R, V, K)``."""
    if probs.dim() != 2:
        raise _shape_error("probs", "[R, V]", probs)
    rows, vocab = probs.shape
    if tuple(tokens.shape) != (rows,):
        raise _shape_error("tokens", f"[R] = [{rows}]", tokens)
    if neighbours.dim() != 2 or neighbours.shape[0] != vocab:
        raise _shape_error("neighbours", f"[V, K] with V = {vocab} (one row per token)", neighbours)
    if neighbours.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"neighbours must be int32 or int64, got {neighbours.dtype}")
    if not budget >= 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    return rows, vocab, neighbours.shape[1]


def _check_group_mass(target_probs, draft_probs, tokens, candidates, embeddings, prob_threshold, dist_threshold):
    """Validates :func:`gsd_group_mass`'s arguments and returns ``(R, V, G, C)``."""
    if target_probs.dim() != 2:
        raise _shape_error("target_probs", "[R, V]", target_probs)
    rows, vocab = target_probs.shape
    if draft_probs is not None and tuple(draft_probs.shape) != (rows, vocab):
        raise _shape_error("draft_probs", f"[R, V] = [{rows}, {vocab}]", draft_probs)
    if tuple(tokens.shape) != (rows,):
        raise _shape_error("tokens", f"[R] = [{rows}]", tokens)
    if candidates.dim() != 2 or candidates.shape[0] != rows:
        raise _shape_error("candidates", f"[R, G] = [{rows}, G]", candidates)
    if embeddings.dim() != 2 or embeddings.shape[0] != vocab:
        raise _shape_error("embeddings", f"[V, C] with V = {vocab} (one row per token)", embeddings)
    if not prob_threshold >= 0 or not dist_threshold >= 0:
        raise ValueError(
            f"thresholds must be >= 0, got prob_threshold={prob_threshold}, dist_threshold={dist_threshold}"
        )
    return rows, vocab, candidates.shape[1], embeddings.shape[1]


def _as_float32(value):
    """A Python scalar rounded to float32, as Triton receives it."""
    return float(torch.tensor(value, dtype=torch.float32))


# --------------------------------------------------------------------------------------------
# PyTorch references
# --------------------------------------------------------------------------------------------


def lantern_neighbour_mass_ref(
    probs,  # [R, V] target probabilities
    tokens,  # [R] draft token per row
    neighbours,  # [V, K] latent neighbours of every token, nearest first (column slices allowed)
    budget,  # float: delta (TVD mode) or lambda - 1 (relative=True)
    relative=False,
):
    """PyTorch reference of :func:`lantern_neighbour_mass` (same arguments and returns)."""
    rows, _, num_neighbours = _check_neighbour_mass(probs, tokens, neighbours, budget)
    device = probs.device
    if num_neighbours == 0 or rows == 0:
        return (
            torch.zeros(rows, dtype=torch.float32, device=device),
            torch.zeros(rows, dtype=torch.long, device=device),
        )
    acc = _accumulation_dtype(device)
    p = probs.float()
    tokens = tokens.long()
    ids = neighbours[tokens].long()  # [R, K]
    cdf = p.gather(1, ids).to(acc).cumsum(-1)  # [R, K], non-decreasing
    limit = torch.full((rows,), _as_float32(budget), dtype=acc, device=device)  # [R]
    if relative:
        limit = limit * p.gather(1, tokens[:, None])[:, 0].to(acc)
    within = cdf <= limit[:, None]  # a prefix of every row, since cdf is non-decreasing
    mass = torch.where(within, cdf, 0.0).amax(-1).float()
    return mass, within.sum(-1)


def gsd_group_mass_ref(
    target_probs,  # [R, V]
    draft_probs,  # [R, V] or None (deterministic drafts: q one-hot at the draft token)
    tokens,  # [R] draft token per row
    candidates,  # [R, G] candidate ids, -1 = no candidate
    embeddings,  # [V, C] token embeddings used for the distance filter
    prob_threshold,
    dist_threshold,
):
    """PyTorch reference of :func:`gsd_group_mass` (same arguments and returns)."""
    _check_group_mass(target_probs, draft_probs, tokens, candidates, embeddings, prob_threshold, dist_threshold)
    acc = _accumulation_dtype(target_probs.device)
    p = target_probs.float()
    tokens = tokens.long()
    candidates = candidates.long()
    valid = candidates >= 0  # [R, G]
    ids = candidates.clamp_min(0)
    p_c = p.gather(1, ids)  # [R, G]
    p_x = p.gather(1, tokens[:, None])  # [R, 1]
    emb = embeddings.float()
    diff = emb[ids].to(acc) - emb[tokens].to(acc)[:, None]  # [R, G, C]
    dist = (diff * diff).sum(-1)  # [R, G] squared Euclidean distance to the draft token
    members = valid & ((p_c - p_x).abs() <= _as_float32(prob_threshold)) & (dist <= _as_float32(dist_threshold))
    if draft_probs is None:
        q_c = (ids == tokens[:, None]).float()
    else:
        q_c = draft_probs.float().gather(1, ids)
    p_sum = torch.where(members, p_c, 0.0).to(acc).sum(-1).float()
    q_sum = torch.where(members, q_c, 0.0).to(acc).sum(-1).float()
    return p_sum, q_sum, members


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def lantern_neighbour_mass_kernel(
        probs_ptr,  # [R, V]
        tokens_ptr,  # [R] int64
        neighbours_ptr,  # [V, *] int32/int64, row stride `neighbour_stride`, unit column stride
        mass_ptr,  # [R] float32
        count_ptr,  # [R] int64
        vocab,
        num_neighbours,
        neighbour_stride,
        budget,  # float32 scalar
        RELATIVE: tl.constexpr,  # limit = budget * p(x) instead of budget
        ACC_DTYPE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One program per row: blockwise prefix sum of the neighbours' target mass (LANTERN
        ``A_{k,delta}(x)``), counting the prefix that stays within the limit."""
        row = tl.program_id(0).to(tl.int64)
        p_row = probs_ptr + row * vocab
        x = tl.load(tokens_ptr + row)
        limit = (tl.zeros((), tl.float32) + budget).to(ACC_DTYPE)  # budget arrives as float32
        if RELATIVE:
            limit = limit * tl.load(p_row + x).to(tl.float32).to(ACC_DTYPE)
        carry = tl.zeros((), ACC_DTYPE)
        mass = tl.zeros((), ACC_DTYPE)
        count = tl.zeros((), tl.int32)
        offs0 = tl.arange(0, BLOCK)
        for start in range(0, num_neighbours, BLOCK):
            offs = start + offs0
            mask = offs < num_neighbours
            ids = tl.load(neighbours_ptr + x * neighbour_stride + offs, mask=mask, other=0)
            w = tl.load(p_row + ids.to(tl.int64), mask=mask, other=0.0).to(tl.float32)
            w = w.to(ACC_DTYPE)
            cdf = tl.cumsum(w, 0) + carry
            within = mask & (cdf <= limit)
            count += tl.sum(within.to(tl.int32), 0)
            mass = tl.maximum(mass, tl.max(tl.where(within, cdf, 0.0), 0))
            carry += tl.sum(w, 0)
        tl.store(mass_ptr + row, mass.to(tl.float32))
        tl.store(count_ptr + row, count.to(tl.int64))

    @triton.jit
    def gsd_group_mass_kernel(
        target_ptr,  # [R, V]
        draft_ptr,  # [R, V] (not read unless Q_MODE == 1)
        tokens_ptr,  # [R] int64
        candidates_ptr,  # [R, G] int64, -1 padded
        embeddings_ptr,  # [V, C] float32
        p_sum_ptr,  # [R] float32
        q_sum_ptr,  # [R] float32
        members_ptr,  # [R, G] int8
        vocab,
        group,
        dim,
        prob_threshold,  # float32 scalar
        dist_threshold,  # float32 scalar
        Q_MODE: tl.constexpr,  # 1: dense draft_probs, 2: one-hot drafts (draft_probs None)
        ACC_DTYPE: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """One program per row: filter the candidates (|p(c) - p(x)| and squared embedding
        distance, dynamic GSD) and sum the members' target and draft probabilities."""
        row = tl.program_id(0).to(tl.int64)
        p_row = target_ptr + row * vocab
        x = tl.load(tokens_ptr + row)
        p_x = tl.load(p_row + x).to(tl.float32)
        offs_g = tl.arange(0, BLOCK_G)
        in_group = offs_g < group
        cand = tl.load(candidates_ptr + row * group + offs_g, mask=in_group, other=-1)
        valid = in_group & (cand >= 0)
        ids = tl.where(valid, cand, 0)
        p_c = tl.load(p_row + ids, mask=valid, other=0.0).to(tl.float32)
        dist = tl.zeros((BLOCK_G,), ACC_DTYPE)
        offs_c0 = tl.arange(0, BLOCK_C)
        for start in range(0, dim, BLOCK_C):
            offs_c = start + offs_c0
            in_dim = offs_c < dim
            e_x = tl.load(embeddings_ptr + x * dim + offs_c, mask=in_dim, other=0.0)
            e_c = tl.load(
                embeddings_ptr + ids[:, None] * dim + offs_c[None, :], mask=valid[:, None] & in_dim[None, :], other=0.0
            )
            diff = e_c.to(ACC_DTYPE) - e_x.to(ACC_DTYPE)[None, :]
            dist += tl.sum(diff * diff, 1)
        dist_limit = (tl.zeros((), tl.float32) + dist_threshold).to(ACC_DTYPE)
        members = valid & (tl.abs(p_c - p_x) <= prob_threshold) & (dist <= dist_limit)
        if Q_MODE == 1:
            q_c = tl.load(draft_ptr + row * vocab + ids, mask=valid, other=0.0).to(tl.float32)
        else:
            q_c = tl.where(ids == x, 1.0, 0.0)
        p_sum = tl.sum(tl.where(members, p_c, 0.0).to(ACC_DTYPE), 0)
        q_sum = tl.sum(tl.where(members, q_c, 0.0).to(ACC_DTYPE), 0)
        tl.store(p_sum_ptr + row, p_sum.to(tl.float32))
        tl.store(q_sum_ptr + row, q_sum.to(tl.float32))
        tl.store(members_ptr + row * group + offs_g, members.to(tl.int8), mask=in_group)

else:
    lantern_neighbour_mass_kernel = None
    gsd_group_mass_kernel = None


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _triton_acc_dtype(device):
    return tl.float32 if _accumulation_dtype(device) == torch.float32 else tl.float64


def _kernel_probs(probs):
    # Half-precision loads are upcast in the kernels; anything else goes in as float32.
    if probs.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return probs.contiguous()
    return probs.float().contiguous()


def lantern_neighbour_mass_triton(probs, tokens, neighbours, budget, relative=False, block_size=None):
    """Triton launcher of :func:`lantern_neighbour_mass`; ``block_size`` (a power of two)
    overrides the neighbour chunk size (tests use it to exercise several chunks)."""
    _require_triton()
    rows, vocab, num_neighbours = _check_neighbour_mass(probs, tokens, neighbours, budget)
    device = probs.device
    mass = torch.zeros(rows, dtype=torch.float32, device=device)
    count = torch.zeros(rows, dtype=torch.long, device=device)
    if rows == 0 or num_neighbours == 0:
        return mass, count
    if neighbours.stride(1) != 1:
        neighbours = neighbours.contiguous()
    block = block_size or min(triton.next_power_of_2(num_neighbours), 1024)
    lantern_neighbour_mass_kernel[(rows,)](
        _kernel_probs(probs),
        tokens.long().contiguous(),
        neighbours,
        mass,
        count,
        vocab,
        num_neighbours,
        neighbours.stride(0),
        _as_float32(budget),
        RELATIVE=bool(relative),
        ACC_DTYPE=_triton_acc_dtype(device),
        BLOCK=block,
        num_warps=4,
    )
    return mass, count


def gsd_group_mass_triton(
    target_probs, draft_probs, tokens, candidates, embeddings, prob_threshold, dist_threshold, block_size=None
):
    """Triton launcher of :func:`gsd_group_mass`; ``block_size`` (a power of two) overrides the
    embedding-dimension chunk size."""
    _require_triton()
    rows, vocab, group, dim = _check_group_mass(
        target_probs, draft_probs, tokens, candidates, embeddings, prob_threshold, dist_threshold
    )
    device = target_probs.device
    p_sum = torch.zeros(rows, dtype=torch.float32, device=device)
    q_sum = torch.zeros(rows, dtype=torch.float32, device=device)
    members = torch.zeros(rows, group, dtype=torch.int8, device=device)
    if rows == 0 or group == 0:
        return p_sum, q_sum, members.bool()
    target = _kernel_probs(target_probs)
    block_c = block_size or min(triton.next_power_of_2(max(dim, 1)), 64)
    gsd_group_mass_kernel[(rows,)](
        target,
        target if draft_probs is None else _kernel_probs(draft_probs),
        tokens.long().contiguous(),
        candidates.long().contiguous(),
        embeddings.float().contiguous(),
        p_sum,
        q_sum,
        members,
        vocab,
        group,
        dim,
        _as_float32(prob_threshold),
        _as_float32(dist_threshold),
        Q_MODE=2 if draft_probs is None else 1,
        ACC_DTYPE=_triton_acc_dtype(device),
        BLOCK_G=triton.next_power_of_2(group),
        BLOCK_C=block_c,
        num_warps=4,
    )
    return p_sum, q_sum, members.bool()


# --------------------------------------------------------------------------------------------
# Dispatchers
# --------------------------------------------------------------------------------------------


def lantern_neighbour_mass(
    probs,  # [R, V] target probabilities
    tokens,  # [R] draft token per row
    neighbours,  # [V, K] latent neighbours of every token, nearest first
    budget,  # float: delta (TVD mode) or lambda - 1 (relative=True)
    relative=False,
):
    """LANTERN's neighbour mass (Jang et al. 2024, arXiv 2410.03355, the set
    ``A_{k,delta}(x)``; LANTERN++ Park et al. 2025, arXiv 2502.06352, multiplicative bound).

    For row ``r`` with draft token ``x = tokens[r]`` and neighbours ``n_1 .. n_K =
    neighbours[x]`` (nearest first, ``x`` itself excluded), returns the largest prefix sum
    ``S = p(n_1) + ... + p(n_j)`` with ``S <= budget`` (``relative=False``: LANTERN's TVD mode,
    ``budget = delta``) or ``S <= budget * p(x)`` (``relative=True``: LANTERN++,
    ``budget = lambda - 1``), and ``j``, the number of neighbours counted (zero-mass neighbours at
    the end of the prefix are counted too: moving their mass changes nothing). Moving ``S`` from
    ``n_1 .. n_j`` onto ``x`` changes the target by exactly ``S`` in total variation.

    Returns ``(mass [R] float32, count [R] int64)``. Triton on CUDA inputs, else
    :func:`lantern_neighbour_mass_ref`.
    """
    use_triton = _use_triton(probs)
    op = lantern_neighbour_mass_triton if use_triton else lantern_neighbour_mass_ref
    return op(probs, tokens, neighbours, budget, relative)


def gsd_group_mass(
    target_probs,  # [R, V]
    draft_probs,  # [R, V] or None (q one-hot at the draft token)
    tokens,  # [R] draft token per row
    candidates,  # [R, G] candidate ids (-1 = none), e.g. mmspec.relaxed.gsd_candidates
    embeddings,  # [V, C] token embeddings (VQ codebook or the GPT's token embedding)
    prob_threshold,
    dist_threshold,
):
    """GSD's group of a draft token and its masses (So et al. 2025, arXiv 2508.07747, dynamic GSD:
    accept ``x`` with ``min(1, sum_G p / sum_G q)``).

    Candidate ``c`` of row ``r`` (draft token ``x``) is a member of ``x``'s group iff
    ``c >= 0``, ``|p(c) - p(x)| <= prob_threshold`` and ``||e_c - e_x||^2 <= dist_threshold``
    (squared Euclidean distance of the embedding rows, as the reference code). ``x`` itself passes
    both filters, so it is a member whenever it is a candidate.

    Returns ``(p_sum [R] float32, q_sum [R] float32, members [R, G] bool)``: the members' target
    and draft masses and the membership mask. Triton on CUDA inputs, else
    :func:`gsd_group_mass_ref`.
    """
    op = gsd_group_mass_triton if _use_triton(target_probs) else gsd_group_mass_ref
    return op(target_probs, draft_probs, tokens, candidates, embeddings, prob_threshold, dist_threshold)
