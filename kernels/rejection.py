"""Fused rejection sampling for speculative decoding: chain and tree verification.

Each op comes in four parts: ``<op>_kernel`` (``@triton.jit``, one program per batch row),
``<op>_triton`` (its launcher), ``<op>_ref`` (PyTorch, vectorised over the batch, any device)
and ``<op>`` (dispatcher: Triton for CUDA inputs when triton imports, else the reference;
``MMSPEC_DISABLE_TRITON=1`` forces the reference).

All randomness comes in as uniforms so that Triton and the reference make the same decisions
on the same inputs. Probabilities are computed in float32 (float16/bfloat16 inputs are upcast);
token ids are int64. Token ids and child indices are trusted to be in range: checking them
would need a host sync.

Sampling rule shared by both ops: from an unnormalised non-negative float32 vector ``w`` and a
uniform ``s`` take the smallest ``j`` with ``cumsum(w)[j] > s * sum(w)`` (inverse CDF). If
rounding leaves no such ``j`` the last index with ``w > 0`` is taken (never a zero-mass token; 0 for
an all-zero row; :func:`inverse_cdf_sample` finds it as the first index where the sum reaches the
total, the same index whenever sums are exact).
Sums are accumulated in float64: float32 weights >= 2**-29 are multiples of 2**-52, so partial
sums up to 2 are exact in float64 and do not depend on the summation order. That is what lets a
blockwise Triton scan and ``torch.cumsum`` pick the same index, and renormalised residuals come
out bit-identical (a float32 scan differs by ~sqrt(V) ulps between orders: at V = 16384 that
flips a few percent of samples).
"""

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .rows import gather_rows

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: without it only the PyTorch reference exists
    triton = None
    tl = None

HAS_TRITON = triton is not None

__all__ = [
    "HAS_TRITON",
    "chain_rejection_sample",
    "chain_rejection_sample_ref",
    "chain_rejection_sample_triton",
    "inverse_cdf_sample",
    "tree_rejection_sample",
    "tree_rejection_sample_ref",
    "tree_rejection_sample_triton",
    "tree_walk_ref",
    "TreeWalk",
]


# --------------------------------------------------------------------------------------------
# Validation and dispatch
# --------------------------------------------------------------------------------------------


def _shape_error(name, expected, tensor):
    return ValueError(f"{name} must have shape {expected}, got {list(tensor.shape)}")


def _check_draft_probs(draft_probs, leading, expected, vocab):
    if draft_probs is None:
        return
    if draft_probs.dim() != 3 or tuple(draft_probs.shape[:2]) != leading:
        raise _shape_error("draft_probs", expected, draft_probs)
    if draft_probs.shape[2] != vocab:
        raise ValueError(f"draft vocabulary size {draft_probs.shape[2]} does not match target vocabulary size {vocab}")


def _check_chain(draft_tokens, draft_probs, target_probs, uniform_accept, uniform_sample):
    """Validates the chain op's shapes and returns ``(B, k, V)``."""
    if draft_tokens.dim() != 2:
        raise _shape_error("draft_tokens", "[B, k]", draft_tokens)
    batch, k = draft_tokens.shape
    if target_probs.dim() != 3 or tuple(target_probs.shape[:2]) != (batch, k + 1):
        raise _shape_error("target_probs", f"[B, k+1, V] = [{batch}, {k + 1}, V]", target_probs)
    vocab = target_probs.shape[2]
    if vocab == 0:
        raise ValueError("target_probs has an empty vocabulary")
    _check_draft_probs(draft_probs, (batch, k), f"[B, k, V] = [{batch}, {k}, {vocab}]", vocab)
    if tuple(uniform_accept.shape) != (batch, k):
        raise _shape_error("uniform_accept", f"[B, k] = [{batch}, {k}]", uniform_accept)
    if tuple(uniform_sample.shape) != (batch,):
        raise _shape_error("uniform_sample", f"[B] = [{batch}]", uniform_sample)
    return batch, k, vocab


def _check_tree(node_tokens, children, draft_probs, target_probs, uniform_accept, uniform_sample, max_depth):
    """Validates the tree op's shapes and returns ``(B, N, C, V)``."""
    if node_tokens.dim() != 2:
        raise _shape_error("node_tokens", "[B, N]", node_tokens)
    batch, num_nodes = node_tokens.shape
    if num_nodes == 0:
        raise ValueError("node_tokens needs at least the root node: got N = 0")
    if children.dim() != 3 or tuple(children.shape[:2]) != (batch, num_nodes):
        raise _shape_error("children", f"[B, N, C] = [{batch}, {num_nodes}, C]", children)
    if target_probs.dim() != 3 or tuple(target_probs.shape[:2]) != (batch, num_nodes):
        raise _shape_error("target_probs", f"[B, N, V] = [{batch}, {num_nodes}, V]", target_probs)
    vocab = target_probs.shape[2]
    if vocab == 0:
        raise ValueError("target_probs has an empty vocabulary")
    _check_draft_probs(draft_probs, (batch, num_nodes), f"[B, N, V] = [{batch}, {num_nodes}, {vocab}]", vocab)
    if tuple(uniform_accept.shape) != (batch, num_nodes):
        raise _shape_error("uniform_accept", f"[B, N] = [{batch}, {num_nodes}]", uniform_accept)
    if tuple(uniform_sample.shape) != (batch,):
        raise _shape_error("uniform_sample", f"[B] = [{batch}]", uniform_sample)
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 0:
        raise ValueError(f"max_depth must be a non-negative int, got {max_depth!r}")
    return batch, num_nodes, children.shape[2], vocab


def _use_triton(probs):
    return HAS_TRITON and probs.is_cuda and os.environ.get("MMSPEC_DISABLE_TRITON", "0") != "1"


def _require_triton():
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: use the *_ref op (or the dispatcher)")


def _kernel_probs(probs):
    # The kernels upcast half-precision loads themselves; anything else goes in as float32.
    if probs.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return probs.contiguous()
    return probs.float().contiguous()


def _nonempty(tensor, stand_in):
    # Triton rejects the null data pointer of an empty tensor (k == 0, C == 0); such an
    # argument is never read, so any valid pointer of the same dtype stands in.
    return tensor if tensor.numel() else stand_in


def _launch_config(vocab, block_size):
    block = block_size or min(triton.next_power_of_2(vocab), 2048)
    return block, (4 if block <= 1024 else 8)


# --------------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------------


def _accumulation_dtype(device):
    # float64 makes sums order-independent (module docstring); MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def inverse_cdf_sample(weights, uniform):
    """Inverse-CDF sample per row of ``weights`` ``[..., V]`` (non-negative, unnormalised) with
    ``uniform`` ``[...]`` in [0, 1); returns int64 ``[...]``. The rule of the module docstring, by
    binary search: the cumulative sum of non-negative weights never decreases (float addition is
    monotone). Capping the threshold just below the total changes nothing where some ``j`` has
    ``cumsum(w)[j] > s * sum(w)`` (no float lies between) and otherwise finds the first index where the
    sum reaches the total: the fallback without a second search (an all-zero row takes index 0)."""
    acc = _accumulation_dtype(weights.device)
    cdf = weights.to(acc).cumsum(-1)  # [..., V]
    total = cdf[..., -1:]  # [..., 1]
    # Toward -1 - total (< total, as the sums are >= 0): the float just below the total, as toward -1, in
    # one op (a tensor made from a Python scalar is two, a host-to-device copy on CUDA among them).
    threshold = torch.minimum(uniform.to(acc)[..., None] * total, torch.nextafter(total, -1 - total))
    return torch.searchsorted(cdf, threshold, right=True)[..., 0]


def _sample_residual_ref(p, q, uniform):
    """Samples from ``max(0, p - q)`` [B, V], or from ``p`` where that residual is all zero:
    then p == q (up to rounding) and the rejection had probability 0 (a drafted token outside
    both supports, or rounding), so any exact sample of p is correct."""
    residual = (p - q).clamp_min(0.0)
    weights = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
    return inverse_cdf_sample(weights, uniform)


def chain_rejection_sample_ref(
    draft_tokens,  # [B, k] int64
    draft_probs,  # [B, k, V] or None (deterministic drafts: q one-hot at the draft token)
    target_probs,  # [B, k+1, V]
    uniform_accept,  # [B, k] in [0, 1)
    uniform_sample,  # [B] in [0, 1)
):
    """PyTorch reference of :func:`chain_rejection_sample` (same arguments and returns)."""
    batch, k, vocab = _check_chain(draft_tokens, draft_probs, target_probs, uniform_accept, uniform_sample)
    tokens = draft_tokens.long()
    target = target_probs.float()
    draft = None if draft_probs is None else draft_probs.float()

    # Kept as [B, k, 1] / [B, 1] columns and written without slices or squeezes: at batch 1 an op
    # costs more than its arithmetic, and this runs once per speculative step.
    x = tokens[..., None]  # [B, k, 1]
    p_x = target.gather(-1, x)  # [B, k, 1]: the index covers positions < k only
    q_x = 1.0 if draft is None else draft.gather(-1, x)
    accepted = uniform_accept.float()[..., None] * q_x < p_x  # [B, k, 1]; == u < min(1, p/q), q = 0 accepts
    # cumprod zeroes everything from the first rejection on
    n = accepted.cumprod(1).sum(1)  # [B, 1] int64
    num_accepted = n[:, 0]  # [B]

    # Rows n of p and q by gather_rows (a gather whose index is expanded over V costs several times
    # more: kernels/rows.py); q's row k (a full acceptance) is zeroed by a product, not read from a
    # zero row padded on: that copies all of q.
    p_n = gather_rows(target, num_accepted)  # [B, V]
    if k == 0:
        q_n = torch.zeros_like(p_n)
    elif draft is None:
        # one-hot at the rejected draft, zero after a full acceptance (then the bonus comes from p_k
        # itself); a scatter, not F.one_hot (which reads the ids back to the host: two syncs per step)
        x_n = tokens.gather(1, n.clamp(max=k - 1))  # [B, 1]
        q_n = torch.zeros_like(p_n).scatter_(1, x_n, (n < k).float())
    else:
        q_n = gather_rows(draft, num_accepted.clamp(max=k - 1)) * (n < k)  # [B, V]; zero after a full acceptance
    final = _sample_residual_ref(p_n, q_n, uniform_sample.float())  # [B]

    position = torch.arange(k + 1, device=tokens.device)
    out_tokens = F.pad(tokens, (0, 1), value=-1).masked_fill_(position > n, -1)
    out_tokens.scatter_(1, n, final[:, None])  # [B, k+1]
    return num_accepted, out_tokens


@dataclass
class TreeWalk:
    """Recursive rejection sampling down a draft tree, before its final draw (:func:`tree_walk_ref`).

    ``num_accepted [B]``, ``accepted_nodes [B, D]`` (-1 padded), ``node [B]`` (where the walk
    stopped: the last accepted node, 0 = the root), ``tokens [B, D + 1]`` (the
    accepted tokens, -1 elsewhere: the final token goes at ``num_accepted``), ``residual [B, V]``
    (what the final token is drawn from: the residual after the last rejection, or the accepted
    leaf's target for the bonus), ``moved_mass [B, D + 1]`` (what ``relax`` moved for each tested
    node, summed per depth; zeros without ``relax``).
    """

    num_accepted: torch.Tensor
    accepted_nodes: torch.Tensor
    node: torch.Tensor
    tokens: torch.Tensor
    residual: torch.Tensor
    moved_mass: torch.Tensor


def tree_walk_ref(
    node_tokens,  # [B, N] int64
    children,  # [B, N, C] int64, -1 padded
    draft_probs,  # [B, N, V] or None (q one-hot at the node's token)
    target_probs,  # [B, N, V]
    uniform_accept,  # [B, N] in [0, 1)
    max_depth,
    relax=None,
):
    """The descent of :func:`tree_rejection_sample_ref` without its final draw: at each depth the
    children are tested in slot order, child ``c`` (token ``x``, proposal ``q_c``) accepted with
    ``min(1, p(x) / q_c(x))``, else ``p <- norm(max(0, p - q_c))`` and the next sibling is tried.

    ``relax(p [B, V], x [B], q [B, V] | None) -> (p~ [B, V], moved [B])`` replaces ``p`` by a
    relaxed target for each test (the lossy rules of :mod:`mmspec.relaxed`); None tests ``p`` itself
    (exact). Loops over depth and child slots in Python; every step is vectorised over the batch.
    Returns a :class:`TreeWalk`.
    """
    batch = node_tokens.shape[0]
    num_slots = children.shape[2]
    device = node_tokens.device
    tokens = node_tokens.long()
    children = children.long()
    target = target_probs.float()
    draft = None if draft_probs is None else draft_probs.float()
    uniform_accept = uniform_accept.float()
    rows = torch.arange(batch, device=device)
    acc = _accumulation_dtype(device)

    cur = torch.zeros(batch, dtype=torch.long, device=device)  # [B] node we stand on
    num_accepted = torch.zeros(batch, dtype=torch.long, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)  # still descending
    p = target[:, 0].clone()  # [B, V] working (residual) target distribution
    accepted_nodes = torch.full((batch, max_depth), -1, dtype=torch.long, device=device)
    out_tokens = torch.full((batch, max_depth + 1), -1, dtype=torch.long, device=device)
    moved_mass = torch.zeros(batch, max_depth + 1, device=device)

    for depth in range(max_depth):
        moved = torch.zeros(batch, dtype=torch.bool, device=device)  # accepted a child here
        for slot in range(num_slots):
            child = children[rows, cur, slot]  # [B]
            tested = active & ~moved & (child >= 0)
            node = child.clamp_min(0)  # padding slots read node 0; their results are discarded
            x = tokens[rows, node]  # [B]
            q = None if draft is None else draft[rows, node]  # [B, V]
            tested_p = p
            if relax is not None:
                tested_p, shift = relax(p, x, q)
                moved_mass[:, depth] += torch.where(tested, shift, 0.0)
            if q is None:  # one-hot at x by a scatter (F.one_hot would read x back to the host)
                q = torch.zeros_like(p).scatter_(1, x[:, None], 1.0)
            p_x = tested_p.gather(1, x[:, None]).squeeze(1)
            q_x = q.gather(1, x[:, None]).squeeze(1)
            accept = tested & (uniform_accept[rows, node] * q_x < p_x)
            reject = tested & ~accept

            residual = (tested_p - q).clamp_min(0.0)
            total = residual.to(acc).sum(-1, keepdim=True).float()  # exact, as in the kernel
            # All-zero residual: p == q, the rejection had probability 0 (see
            # _sample_residual_ref); fall back to the node's own target.
            residual = torch.where(total > 0, residual / total, target[rows, cur])
            p = torch.where(accept[:, None], target[rows, node], torch.where(reject[:, None], residual, p))
            accepted_nodes[:, depth] = torch.where(accept, child, accepted_nodes[:, depth])
            out_tokens[:, depth] = torch.where(accept, x, out_tokens[:, depth])
            cur = torch.where(accept, node, cur)
            moved |= accept
        active &= moved
        num_accepted += moved.long()
    return TreeWalk(num_accepted, accepted_nodes, cur, out_tokens, p, moved_mass)


def tree_rejection_sample_ref(
    node_tokens,  # [B, N] int64
    children,  # [B, N, C] int64, -1 padded
    draft_probs,  # [B, N, V] or None (q one-hot at the node's token)
    target_probs,  # [B, N, V]
    uniform_accept,  # [B, N] in [0, 1)
    uniform_sample,  # [B] in [0, 1)
    max_depth,
):
    """PyTorch reference of :func:`tree_rejection_sample` (same arguments and returns): the
    descent of :func:`tree_walk_ref`, then the recovered or bonus token drawn from its residual."""
    _check_tree(node_tokens, children, draft_probs, target_probs, uniform_accept, uniform_sample, max_depth)
    walk = tree_walk_ref(node_tokens, children, draft_probs, target_probs, uniform_accept, max_depth)
    final = inverse_cdf_sample(walk.residual, uniform_sample.float())  # recovered or bonus token
    walk.tokens.scatter_(1, walk.num_accepted[:, None], final[:, None])
    return walk.num_accepted, walk.accepted_nodes, walk.tokens


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _residual_block(p, q_row, x, q_limit, offs, Q_MODE: tl.constexpr):
        """max(0, p - q) on one block; q is 0 (Q_MODE 0), the dense row ``q_row`` read below
        ``q_limit`` (Q_MODE 1: ``q_limit`` = V, or 0 to switch q off) or one-hot at token
        ``x`` (Q_MODE 2: ``x`` = -1 switches it off)."""
        if Q_MODE == 1:
            q = tl.load(q_row + offs, mask=offs < q_limit, other=0.0).to(tl.float32)
        elif Q_MODE == 2:
            q = tl.where(offs == x, 1.0, 0.0)
        else:
            q = tl.zeros_like(p)
        return tl.maximum(p - q, 0.0)

    @triton.jit
    def _sample_residual(p_row, q_row, x, q_limit, s, vocab, BLOCK: tl.constexpr, Q_MODE: tl.constexpr):
        """Inverse-CDF sample (uniform ``s``) from max(0, p - q), or p if that is all zero.
        Two passes over V: totals, then a blockwise running cumsum (same rule as the ref)."""
        offs0 = tl.arange(0, BLOCK)
        total_r = tl.zeros((), tl.float64)  # float64 sums are order-independent (module doc)
        total_p = tl.zeros((), tl.float64)
        for start in range(0, vocab, BLOCK):
            offs = start + offs0
            mask = offs < vocab
            p = tl.load(p_row + offs, mask=mask, other=0.0).to(tl.float32)
            r = _residual_block(p, q_row, x, q_limit, offs, Q_MODE)
            total_r += tl.sum(r.to(tl.float64), 0)
            total_p += tl.sum(p.to(tl.float64), 0)
        use_residual = total_r > 0
        threshold = s.to(tl.float64) * tl.where(use_residual, total_r, total_p)
        carry = tl.zeros((), tl.float64)
        first = tl.zeros((), tl.int32) + vocab
        last_positive = tl.zeros((), tl.int32)
        for start in range(0, vocab, BLOCK):
            offs = start + offs0
            mask = offs < vocab
            p = tl.load(p_row + offs, mask=mask, other=0.0).to(tl.float32)
            w = tl.where(use_residual, _residual_block(p, q_row, x, q_limit, offs, Q_MODE), p)
            w = w.to(tl.float64)
            cdf = tl.cumsum(w, 0) + carry
            first = tl.minimum(first, tl.min(tl.where(mask & (cdf > threshold), offs, vocab), 0))
            last_positive = tl.maximum(last_positive, tl.max(tl.where(mask & (w > 0), offs, 0), 0))
            carry += tl.sum(w, 0)
        return tl.where(first < vocab, first, last_positive)

    @triton.jit
    def _copy_row(dst_row, src_row, vocab, BLOCK: tl.constexpr):
        offs0 = tl.arange(0, BLOCK)
        for start in range(0, vocab, BLOCK):
            offs = start + offs0
            mask = offs < vocab
            tl.store(dst_row + offs, tl.load(src_row + offs, mask=mask).to(tl.float32), mask=mask)

    @triton.jit
    def chain_rejection_sample_kernel(
        draft_tokens_ptr,  # [B, k] int64
        draft_probs_ptr,  # [B, k, V] (not read unless Q_MODE == 1)
        target_probs_ptr,  # [B, k+1, V]
        uniform_accept_ptr,  # [B, k] float32
        uniform_sample_ptr,  # [B] float32
        num_accepted_ptr,  # [B] int64
        out_tokens_ptr,  # [B, k+1] int64, pre-filled with -1
        k,
        vocab,
        BLOCK: tl.constexpr,
        Q_MODE: tl.constexpr,  # 1: dense draft_probs, 2: one-hot drafts (draft_probs None)
    ):
        """One program per row: Leviathan et al. 2023 / Chen et al. 2023 Alg. 1."""
        row = tl.program_id(0).to(tl.int64)
        tokens_row = draft_tokens_ptr + row * k
        num_accepted = tl.zeros((), tl.int32)
        alive = tl.zeros((), tl.int32) + 1  # 0 after the first rejection
        for i in range(k):
            x = tl.load(tokens_row + i)
            p_x = tl.load(target_probs_ptr + (row * (k + 1) + i) * vocab + x).to(tl.float32)
            if Q_MODE == 1:
                q_x = tl.load(draft_probs_ptr + (row * k + i) * vocab + x).to(tl.float32)
            else:
                q_x = 1.0
            u = tl.load(uniform_accept_ptr + row * k + i)
            alive = alive * (u * q_x < p_x).to(tl.int32)
            num_accepted += alive
            tl.store(out_tokens_ptr + row * (k + 1) + i, x, mask=alive != 0)

        rejected = num_accepted < k  # else bonus token: sample p_k itself (q off)
        slot = tl.minimum(num_accepted, k - 1)  # k == 0 gives -1: q is then off, never read
        x_n = tl.load(tokens_row + slot, mask=rejected, other=-1)
        token = _sample_residual(
            target_probs_ptr + (row * (k + 1) + num_accepted) * vocab,
            draft_probs_ptr + (row * k + slot) * vocab,
            x_n,
            tl.where(rejected, vocab, 0),
            tl.load(uniform_sample_ptr + row),
            vocab,
            BLOCK,
            Q_MODE,
        )
        tl.store(out_tokens_ptr + row * (k + 1) + num_accepted, token.to(tl.int64))
        tl.store(num_accepted_ptr + row, num_accepted.to(tl.int64))

    @triton.jit
    def tree_rejection_sample_kernel(
        node_tokens_ptr,  # [B, N] int64
        children_ptr,  # [B, N, C] int64, -1 padded
        draft_probs_ptr,  # [B, N, V] (not read unless Q_MODE == 1)
        target_probs_ptr,  # [B, N, V]
        uniform_accept_ptr,  # [B, N] float32
        uniform_sample_ptr,  # [B] float32
        work_ptr,  # [B, V] float32 scratch: the working (residual) target distribution
        num_accepted_ptr,  # [B] int64
        accepted_nodes_ptr,  # [B, D] int64, pre-filled with -1
        out_tokens_ptr,  # [B, D+1] int64, pre-filled with -1
        num_nodes,
        num_slots,
        vocab,
        max_depth,
        BLOCK: tl.constexpr,
        Q_MODE: tl.constexpr,  # 1: dense draft_probs, 2: one-hot drafts (draft_probs None)
    ):
        """One program per row: recursive rejection sampling over siblings (SpecInfer, Miao
        et al. 2024; Recursive Speculative Decoding, Jeon et al. 2024)."""
        row = tl.program_id(0).to(tl.int64)
        work = work_ptr + row * vocab
        offs0 = tl.arange(0, BLOCK)
        _copy_row(work, target_probs_ptr + row * num_nodes * vocab, vocab, BLOCK)
        tl.debug_barrier()  # the working row is written and read by different lanes

        cur = tl.zeros((), tl.int32)  # node we stand on
        depth = tl.zeros((), tl.int32)  # = number accepted so far
        active = tl.zeros((), tl.int32) + 1  # still descending
        for _ in range(max_depth):
            moved = tl.zeros((), tl.int32)  # accepted a child at this depth
            for slot in range(num_slots):
                child = tl.load(children_ptr + (row * num_nodes + cur) * num_slots + slot)
                child = child.to(tl.int32)
                if (child >= 0) & (active != 0) & (moved == 0):
                    node = row * num_nodes + child
                    x = tl.load(node_tokens_ptr + node)
                    p_x = tl.load(work + x)
                    q_row = draft_probs_ptr + node * vocab
                    if Q_MODE == 1:
                        q_x = tl.load(q_row + x).to(tl.float32)
                    else:
                        q_x = 1.0
                    u = tl.load(uniform_accept_ptr + node)
                    tl.debug_barrier()  # all lanes have read p_x before the row is rewritten
                    if u * q_x < p_x:
                        tl.store(accepted_nodes_ptr + row * max_depth + depth, child.to(tl.int64))
                        tl.store(out_tokens_ptr + row * (max_depth + 1) + depth, x)
                        _copy_row(work, target_probs_ptr + node * vocab, vocab, BLOCK)
                        cur = child
                        depth += 1
                        moved = tl.zeros((), tl.int32) + 1
                    else:
                        # p <- normalise(max(0, p - q))
                        total = tl.zeros((), tl.float64)  # exact: same bits as the reference
                        for start in range(0, vocab, BLOCK):
                            offs = start + offs0
                            mask = offs < vocab
                            p = tl.load(work + offs, mask=mask, other=0.0)
                            r = _residual_block(p, q_row, x, vocab, offs, Q_MODE)
                            total += tl.sum(r.to(tl.float64), 0)
                        total = total.to(tl.float32)
                        if total > 0:
                            for start in range(0, vocab, BLOCK):
                                offs = start + offs0
                                mask = offs < vocab
                                p = tl.load(work + offs, mask=mask, other=0.0)
                                r = _residual_block(p, q_row, x, vocab, offs, Q_MODE)
                                # IEEE division (plain "/" compiles to approximate
                                # div.full.f32): the same bits as the reference
                                tl.store(work + offs, tl.math.div_rn(r, total), mask=mask)
                        else:
                            # p == q: probability-0 rejection, fall back to the node's target
                            _copy_row(work, target_probs_ptr + (row * num_nodes + cur) * vocab, vocab, BLOCK)
                    tl.debug_barrier()
            active = active * moved

        # Q_MODE 0: sample the working row itself (recovered or bonus token)
        token = _sample_residual(work, work, -1, 0, tl.load(uniform_sample_ptr + row), vocab, BLOCK, 0)
        tl.store(out_tokens_ptr + row * (max_depth + 1) + depth, token.to(tl.int64))
        tl.store(num_accepted_ptr + row, depth.to(tl.int64))

else:
    chain_rejection_sample_kernel = None
    tree_rejection_sample_kernel = None


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def chain_rejection_sample_triton(
    draft_tokens,  # [B, k] int64
    draft_probs,  # [B, k, V] or None
    target_probs,  # [B, k+1, V]
    uniform_accept,  # [B, k]
    uniform_sample,  # [B]
    block_size=None,
):
    """Triton launcher of :func:`chain_rejection_sample`; ``block_size`` (a power of two)
    overrides the vocabulary chunk size (tests use it to exercise several chunks)."""
    _require_triton()
    batch, k, vocab = _check_chain(draft_tokens, draft_probs, target_probs, uniform_accept, uniform_sample)
    device = draft_tokens.device
    target = _kernel_probs(target_probs)
    num_accepted = torch.empty(batch, dtype=torch.long, device=device)
    out_tokens = torch.full((batch, k + 1), -1, dtype=torch.long, device=device)
    if batch == 0:
        return num_accepted, out_tokens
    block, num_warps = _launch_config(vocab, block_size)
    uniform_sample = uniform_sample.float().contiguous()
    chain_rejection_sample_kernel[(batch,)](
        _nonempty(draft_tokens.long().contiguous(), num_accepted),
        target if draft_probs is None else _nonempty(_kernel_probs(draft_probs), target),
        target,
        _nonempty(uniform_accept.float().contiguous(), uniform_sample),
        uniform_sample,
        num_accepted,
        out_tokens,
        k,
        vocab,
        BLOCK=block,
        Q_MODE=2 if draft_probs is None else 1,
        num_warps=num_warps,
    )
    return num_accepted, out_tokens


def tree_rejection_sample_triton(
    node_tokens,  # [B, N] int64
    children,  # [B, N, C] int64
    draft_probs,  # [B, N, V] or None
    target_probs,  # [B, N, V]
    uniform_accept,  # [B, N]
    uniform_sample,  # [B]
    max_depth,
    block_size=None,
):
    """Triton launcher of :func:`tree_rejection_sample`; allocates the [B, V] float32 scratch
    row holding each program's working residual. ``block_size`` as in the chain launcher."""
    _require_triton()
    batch, num_nodes, num_slots, vocab = _check_tree(
        node_tokens, children, draft_probs, target_probs, uniform_accept, uniform_sample, max_depth
    )
    device = node_tokens.device
    target = _kernel_probs(target_probs)
    num_accepted = torch.empty(batch, dtype=torch.long, device=device)
    accepted_nodes = torch.full((batch, max_depth), -1, dtype=torch.long, device=device)
    out_tokens = torch.full((batch, max_depth + 1), -1, dtype=torch.long, device=device)
    if batch == 0:
        return num_accepted, accepted_nodes, out_tokens
    block, num_warps = _launch_config(vocab, block_size)
    tree_rejection_sample_kernel[(batch,)](
        node_tokens.long().contiguous(),
        _nonempty(children.long().contiguous(), num_accepted),
        target if draft_probs is None else _kernel_probs(draft_probs),
        target,
        uniform_accept.float().contiguous(),
        uniform_sample.float().contiguous(),
        torch.empty(batch, vocab, dtype=torch.float32, device=device),
        num_accepted,
        accepted_nodes,
        out_tokens,
        num_nodes,
        num_slots,
        vocab,
        max_depth,
        BLOCK=block,
        Q_MODE=2 if draft_probs is None else 1,
        num_warps=num_warps,
    )
    return num_accepted, accepted_nodes, out_tokens


# --------------------------------------------------------------------------------------------
# Dispatchers
# --------------------------------------------------------------------------------------------


def chain_rejection_sample(
    draft_tokens,  # [B, k] int64
    draft_probs,  # [B, k, V] or None
    target_probs,  # [B, k+1, V]
    uniform_accept,  # [B, k] in [0, 1)
    uniform_sample,  # [B] in [0, 1)
):
    """Exact speculative sampling of a chain of ``k`` draft tokens (Leviathan et al. 2023,
    "Fast Inference from Transformers via Speculative Decoding"; Chen et al. 2023,
    "Accelerating LLM Decoding with Speculative Sampling", Alg. 1).

    Draft token ``i`` (``x``) is accepted iff ``uniform_accept[b, i] * q(x) < p(x)``, i.e.
    ``u < min(1, p/q)``, with ``p = target_probs[b, i]`` and ``q = draft_probs[b, i]`` (one-hot
    at ``x`` when ``draft_probs`` is None); the first rejection stops the row. At a rejection
    the recovered token is sampled from ``max(0, p - q)`` (from ``p`` if that is all zero,
    i.e. p == q and the rejection had probability 0); after ``k`` acceptances the bonus token
    is sampled from ``target_probs[b, k]``. Both use ``uniform_sample[b]`` by inverse CDF. The
    output is distributed exactly as sampling from the target.

    Returns ``(num_accepted [B] int64, out_tokens [B, k+1] int64)``: ``out_tokens[b, :n]`` are
    the accepted drafts, ``out_tokens[b, n]`` the recovered or bonus token, the rest ``-1``.
    Triton on CUDA inputs, else :func:`chain_rejection_sample_ref`.
    """
    op = chain_rejection_sample_triton if _use_triton(target_probs) else chain_rejection_sample_ref
    return op(draft_tokens, draft_probs, target_probs, uniform_accept, uniform_sample)


def tree_rejection_sample(
    node_tokens,  # [B, N] int64
    children,  # [B, N, C] int64, -1 padded
    draft_probs,  # [B, N, V] or None
    target_probs,  # [B, N, V]
    uniform_accept,  # [B, N] in [0, 1)
    uniform_sample,  # [B] in [0, 1)
    max_depth,
):
    """Multi-draft / tree verification by recursive rejection sampling over siblings
    (SpecInfer, Miao et al. 2024; Recursive Speculative Decoding, Jeon et al. 2024).

    Node 0 is the root (the last committed token, not tested). ``children[b, n]`` lists n's
    children in test order (larger indices than n, ``-1`` padded); ``draft_probs[b, c]`` is
    the proposal child ``c`` was drawn from (one-hot at ``node_tokens[b, c]`` when None);
    ``target_probs[b, n]`` is the target distribution after node ``n``; ``uniform_accept[b, c]``
    is used when ``c`` is tested; ``max_depth`` bounds the draft tokens on any root-to-leaf
    path (deeper nodes are never tested).

    Per row, starting at the root with ``p = target_probs[b, 0]``: child ``c`` (token ``x``,
    proposal ``q``) is accepted iff ``u_c * q(x) < p(x)``; then the walk moves to ``c`` with
    ``p = target_probs[b, c]``. A rejection sets ``p = normalise(max(0, p - q))`` (falling back
    to ``target_probs[b, cur]`` if that is all zero, i.e. p == q and the rejection had
    probability 0) and tests the next sibling. When a node has no child left to test, the
    final token (recovered if a sibling was rejected there, else bonus) is sampled from ``p``
    with ``uniform_sample[b]``. Lossless whenever each child's proposal is given conditionally
    on its earlier siblings (i.i.d. drafts, sampling without replacement, deterministic top-k
    with ``draft_probs`` None).

    Returns ``(num_accepted [B] int64, accepted_nodes [B, max_depth] int64,
    out_tokens [B, max_depth+1] int64)``, ``-1`` padded. Triton on CUDA inputs, else
    :func:`tree_rejection_sample_ref`.
    """
    op = tree_rejection_sample_triton if _use_triton(target_probs) else tree_rejection_sample_ref
    return op(node_tokens, children, draft_probs, target_probs, uniform_accept, uniform_sample, max_depth)
