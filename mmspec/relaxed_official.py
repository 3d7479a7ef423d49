"""The official LANTERN / LANTERN++ and GSD acceptance rules, reproduced (``variant="official"``).

mmspec's own relaxed rules (:mod:`mmspec.relaxed`) keep every relaxed target a distribution with a
stated total-variation bound. The authors' code differs in several places; these functions
reproduce it, so that speed/quality numbers can be compared with the papers'. They are reached
through ``LanternAcceptance(variant="official", ...)`` and ``GSDAcceptance(variant="official", ...)``;
``docs/relaxed_rules.md`` lists every difference with its measured effect.

LANTERN (Jang et al. 2024, arXiv 2410.03355) and LANTERN++ (Park et al. 2025, arXiv 2502.06352),
repository ``jadohu/LANTERN``:

* neighbour tables from the raw ``vq_model.quantize.embedding.weight`` rows (``torch.cdist``,
  ``entrypoints/generate_codebook.py``; the pipeline's ``neighbour_rows="raw"``);
* acceptance (``models/ea_model_llamagen.py::evaluate_posterior`` / ``evaluate_posterior_v1``):
  ``px = p(x) + S`` with ``S`` the float32 prefix sum of the first ``k`` neighbours' mass at the last
  index where it is ``<= delta`` (or ``<= (lambda - 1) p(x)``: the official ``lantern_delta > 1``),
  accepted iff ``r <= px / qx``;
* residual after a rejection, per tree type (:data:`LANTERN_PATHS`): dynamic trees (EAGLE-2,
  ``evaluate_posterior``, ``qx = 1``) zero ``x`` and, when a neighbour was counted, the first
  ``k + 1`` listed neighbours of the working distribution; static trees (EAGLE-1,
  ``evaluate_posterior_v1``) take ``norm(max(0, p - q))`` where LlamaGen's path first zeroes the
  *draft* ``q`` at those ``k + 1`` neighbours and Lumina-mGPT's path
  (``models/ea_model_lumina_mgpt.py::evaluate_posterior``, ``eagle_version == 1``) zeroes the
  *target* there; an all-zero residual becomes uniform;
* greedy mode (the ``logits_processor is None`` branch of both functions): the target is the
  softmax at temperature 1 of the (CFG-combined) logits; draft ``x`` stands iff raising ``p(x)``
  to ``px`` makes it the argmax; the longest accepted path wins (first path on ties); the token
  after it is the target's argmax.

GSD (So et al. 2025, arXiv 2508.07747), repository ``junhyukso/GSD``,
``scheduler/jacobi_iteration_lumina_mgpt.py::SpeculativeSampler.__call__``:

* the group window is the slice ``[pos - 7 : pos + 7]`` of the *ascending* sort of the target's
  logits (``pos``: the draft token's place in it) — for the 7 lowest-ranked tokens the slice start
  wraps to ``V + pos - 7``, the slice comes out empty and the ``except`` branch falls back to
  ``min(1, p(x) / q(x))``; members pass ``|p(c) - p(x)| < 0.15`` and ``||e_c - e_x||^2 < 0.5``
  (strict);
* acceptance ``min(1, P / Q)`` over the members, ``r < min(1, P/Q)``;
* residual ``softmax(log(max(0, p - q)))`` = ``norm(max(0, p - q))``
  (``reject_sampling_single_token`` / ``get_reject_sampling_logits``).

Lossy, with **no bound**: these reproduce the official code. The per-token ``moved_mass`` they report
is ``TVD(a δ_x + (1 - a) r, p)`` with the acceptance probability ``a`` and residual ``r`` the rule
gives a *deterministic* draft of ``x`` (``q`` one-hot): exactly the committed token's law for
deterministic drafts (EAGLE-2 trees), and a q-independent measure of the relaxation otherwise — the
quantity mmspec's own rules report as ``TVD(p~_x, p)`` (0 for exact sampling).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .kernels.rejection import TreeWalk, chain_rejection_sample
from .tree import DraftTree
from .types import Draft, Verdict

__all__ = [
    "LANTERN_PATHS",
    "gsd_official_accept_prob",
    "gsd_official_residual",
    "gsd_official_window",
    "lantern_official_greedy_pass",
    "lantern_official_mass",
    "lantern_official_residual",
    "official_tree_walk",
    "verify_gsd_official",
    "verify_lantern_official",
    "verify_lantern_official_greedy",
]

#: Residual paths of the official LANTERN code: ``"dynamic"`` (EAGLE-2 trees, ``evaluate_posterior``:
#: draft probabilities ignored, ``qx = 1``), ``"static-llamagen"`` (EAGLE-1 trees,
#: ``ea_model_llamagen.py::evaluate_posterior_v1``: draft q zeroed at the neighbours),
#: ``"static-lumina"`` (``ea_model_lumina_mgpt.py::evaluate_posterior``, ``eagle_version == 1``: target
#: zeroed at the neighbours). ``"auto"`` picks dynamic without draft probabilities, else static-llamagen.
LANTERN_PATHS = ("auto", "dynamic", "static-llamagen", "static-lumina")


def _resolve_path(path: str, draft_probs: torch.Tensor | None) -> str:
    if path == "auto":
        return "dynamic" if draft_probs is None else "static-llamagen"
    return path


# --------------------------------------------------------------------------------------------
# LANTERN
# --------------------------------------------------------------------------------------------


def lantern_official_mass(
    probs: torch.Tensor,  # [R, V] working target distribution (gtp)
    tokens: torch.Tensor,  # [R] draft tokens
    neighbours: torch.Tensor,  # [V, K >= k] latent neighbours, nearest first
    k: int,
    limit: float,  # delta (relative=False) or lambda - 1 (relative=True)
    relative: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LANTERN's relaxed mass as ``evaluate_posterior`` computes it: the float32 cumulative sum of
    the first ``k`` neighbours' probabilities, taken at the *last* index where it is ``<= limit``
    (``<= limit * p(x)`` when ``relative``: the official ``lantern_delta > 1`` branch).

    Returns ``(mass [R] float32, counted [R] bool)``: ``counted`` is the official ``indices != -1``
    (some prefix fits), which also decides whether the residual zeroes the neighbours."""
    p = probs.float()
    x = tokens.long()
    ids = neighbours[x, :k].long()  # [R, k]
    cumsum = p.gather(1, ids).cumsum(-1)  # [R, k] float32, as the official torch.cumsum on gtp
    bound = torch.full_like(cumsum[:, 0], float(limit))
    if relative:
        bound = bound * p.gather(1, x[:, None])[:, 0]
    within = cumsum <= bound[:, None]  # [R, k]
    positions = torch.arange(k, device=p.device).expand_as(within)
    last = torch.where(within, positions, -1).amax(-1)  # [R] official indices[-1], -1 if none
    counted = last >= 0
    mass = torch.where(counted, cumsum.gather(1, last.clamp_min(0)[:, None])[:, 0], 0.0)
    return mass, counted


def lantern_official_residual(
    probs: torch.Tensor,  # [R, V] working target distribution
    tokens: torch.Tensor,  # [R] rejected draft tokens
    draft_probs: torch.Tensor | None,  # [R, V] proposals (static paths), None = one-hot at the token
    neighbours: torch.Tensor,  # [V, K >= min(k + 1, V - 1)]
    k: int,
    counted: torch.Tensor,  # [R] bool from lantern_official_mass
    path: str,
) -> torch.Tensor:
    """The distribution the official code continues with after rejecting ``x`` (normalised
    ``[R, V]``; all-zero becomes uniform, as ``if gtp.sum() == 0: gtp = torch.ones_like(gtp)``).

    ``path`` (:data:`LANTERN_PATHS`, resolved): ``"dynamic"`` zeroes ``x`` and, where ``counted``,
    the first ``k + 1`` listed neighbours (``gtp[nearest_latents[xi, :lantern_k + 1]] = 0``);
    ``"static-llamagen"`` takes ``max(0, p - q')`` with ``q' = q`` zeroed at those neighbours;
    ``"static-lumina"`` takes ``max(0, p' - q)`` with ``p' = p`` zeroed there."""
    p = probs.float()
    x = tokens.long()
    vocab = p.shape[-1]
    nb = neighbours[x, : min(k + 1, vocab - 1)].long()  # [R, k + 1] (Python slicing caps at V - 1)
    zero_nb = counted[:, None].expand_as(nb)  # [R, k + 1]

    def zeroed(dist: torch.Tensor) -> torch.Tensor:  # dist with the listed neighbours zeroed where counted
        return dist.scatter(1, nb, torch.where(zero_nb, 0.0, dist.gather(1, nb)))

    if path == "dynamic":
        residual = zeroed(p).scatter(1, x[:, None], 0.0)
    else:
        q = F.one_hot(x, vocab).float() if draft_probs is None else draft_probs.float()
        residual = (p - zeroed(q)).clamp_min(0.0) if path == "static-llamagen" else (zeroed(p) - q).clamp_min(0.0)
    total = residual.sum(-1, keepdim=True)
    residual = torch.where(total > 0, residual, torch.ones_like(residual))
    return residual / residual.sum(-1, keepdim=True)


def lantern_official_greedy_pass(
    probs: torch.Tensor,  # [R, V] softmax at temperature 1 of the target logits
    tokens: torch.Tensor,  # [R] draft tokens
    neighbours: torch.Tensor,  # [V, K >= k]
    k: int,
    limit: float,
    relative: bool = False,
) -> torch.Tensor:
    """LANTERN's greedy test (``evaluate_posterior``'s ``logits_processor is None`` branch): raise
    ``p(x)`` to ``p(x) + S`` (:func:`lantern_official_mass`), leave every other entry, and keep ``x``
    iff ``argmax`` then returns ``x`` (first index on ties, as ``torch.argmax``). Returns ``[R]`` bool."""
    p = probs.float()
    x = tokens.long()
    mass, _ = lantern_official_mass(p, x, neighbours, k, limit, relative)
    raised = p.scatter(1, x[:, None], p.gather(1, x[:, None]) + mass[:, None])
    return raised.argmax(-1) == x


# --------------------------------------------------------------------------------------------
# GSD
# --------------------------------------------------------------------------------------------


def gsd_official_window(
    probs: torch.Tensor,  # [R, V] target probabilities (their order is the logits' order)
    tokens: torch.Tensor,  # [R] draft tokens
    group_size: int = 14,
) -> torch.Tensor:
    """The official candidate window: ``logit_sort[pos - G//2 : pos + (G+1)//2]`` of the ascending
    sort (``G = 14``: ``[pos - 7 : pos + 7]``) with Python's slice rules — a negative start counts
    from the end (``V + pos - 7``), so for the ``G // 2`` lowest-ranked tokens the slice is empty
    (any ``V >= G``); the top end is cut at ``V``. Ties are ordered by increasing id (the official
    ``sort`` leaves their order unspecified). Returns ``[R, G]`` int64 ids, -1 past the slice's end."""
    p = probs.float()
    x = tokens.long()
    vocab = p.shape[-1]
    order = p.argsort(dim=-1, stable=True)  # [R, V] ascending
    pos = (order == x[:, None]).int().argmax(-1)  # [R] official torch.nonzero(logit_sort == cls_idx)
    start = pos - group_size // 2
    start = torch.where(start < 0, start + vocab, start).clamp_min(0)  # Python slice start
    stop = (pos + (group_size + 1) // 2).clamp_max(vocab)
    offsets = torch.arange(group_size, device=p.device)
    slots = start[:, None] + offsets  # [R, G] positions in the ascending order
    inside = slots < stop[:, None]
    return torch.where(inside, order.gather(1, slots.clamp_max(vocab - 1)), -1)


def gsd_official_accept_prob(
    probs: torch.Tensor,  # [R, V] target
    tokens: torch.Tensor,  # [R] draft tokens
    draft_probs: torch.Tensor | None,  # [R, V], None = one-hot at the draft token
    embeddings: torch.Tensor,  # [V, C] rows for the distance filter
    group_size: int = 14,
    prob_threshold: float = 0.15,
    dist_threshold: float = 0.5,
) -> torch.Tensor:
    """``min(1, P / Q)`` over the official group (strict ``<`` filters), or ``min(1, p(x) / q(x))``
    where the window is empty (the ``except`` branch). ``[R]`` float32; NaN (0/0) rejects, as in the
    official ``r < final_p``."""
    p = probs.float()
    x = tokens.long()
    vocab = p.shape[-1]
    q = F.one_hot(x, vocab).float() if draft_probs is None else draft_probs.float()
    window = gsd_official_window(p, x, group_size)  # [R, G]
    valid = window >= 0
    ids = window.clamp_min(0)
    p_c, q_c = p.gather(1, ids), q.gather(1, ids)  # [R, G]
    p_x, q_x = p.gather(1, x[:, None])[:, 0], q.gather(1, x[:, None])[:, 0]  # [R]
    emb = embeddings.double()
    dist = (emb[ids] - emb[x][:, None]).pow(2).sum(-1)  # [R, G] squared Euclidean (head_img_sims)
    members = valid & ((p_c - p_x[:, None]).abs() < prob_threshold) & (dist < dist_threshold)
    ratio_group = (torch.where(members, p_c, 0.0).sum(-1) / torch.where(members, q_c, 0.0).sum(-1)).clamp(max=1)
    ratio_plain = (p_x / q_x).clamp(max=1)
    return torch.where(valid.any(-1), ratio_group, ratio_plain)


def gsd_official_residual(
    probs: torch.Tensor,  # [R, V]
    tokens: torch.Tensor,  # [R]
    draft_probs: torch.Tensor | None,  # [R, V] or None (one-hot)
) -> torch.Tensor:
    """``norm(max(0, p - q))`` (``reject_sampling_single_token``: softmax of ``log(max(0, p - q))``).
    Where it is all zero (the official code would draw from NaNs) ``p`` itself: the rejection had
    probability 0. ``[R, V]``."""
    p = probs.float()
    q = F.one_hot(tokens.long(), p.shape[-1]).float() if draft_probs is None else draft_probs.float()
    residual = (p - q).clamp_min(0.0)
    total = residual.sum(-1, keepdim=True)
    return torch.where(total > 0, residual / torch.where(total > 0, total, 1.0), p)


# --------------------------------------------------------------------------------------------
# The official sibling walk and the verify entry points
# --------------------------------------------------------------------------------------------


def official_tree_walk(
    node_tokens: torch.Tensor,  # [B, N]
    children: torch.Tensor,  # [B, N, C], -1 padded
    draft_probs: torch.Tensor | None,  # [B, N, V] proposal of each node given its earlier siblings, or None
    target: torch.Tensor,  # [B, N, V]
    uniform: torch.Tensor,  # [B, N]
    max_depth: int,
    accept_prob: Callable,  # (p [B, V], x [B], q [B, V] | None) -> (a [B], state)
    residual: Callable,  # (p [B, V], x [B], q [B, V] | None, state) -> [B, V]
    qx_from: str | None = None,  # None: accept_prob already includes q; "one" (qx = 1); "first-sibling"
    dedupe: bool = False,
    skip_zero_q: bool = False,
    strict: bool = True,
) -> TreeWalk:
    """The level-by-level sibling loop of the official ``evaluate_posterior`` functions, vectorised
    over rows: at each depth the children of the current node are tried in order; ``a`` comes from
    ``accept_prob`` on the working distribution ``p`` (divided by ``qx`` unless ``qx_from`` is None:
    ``"one"`` = the official dynamic trees' ``qx = 1.0``, ``"first-sibling"`` = EAGLE-1's
    ``cart_candidates_prob``, the proposal before earlier siblings were removed, i.e. the first
    child's) and ``x`` is accepted iff ``u < a`` (``strict``, GSD) or ``u <= a`` (LANTERN's
    ``r <= acp``); a rejection
    replaces ``p`` by ``residual(...)``. ``dedupe`` skips a token already tried at this level
    (``candidates_set``); ``skip_zero_q`` skips children with ``qx <= 0`` (``continue``) after
    recording them. After an acceptance the next level starts from the target at the new node.
    Returns a :class:`~mmspec.kernels.TreeWalk` (``moved_mass``: per depth, the sum over tested
    children of ``TVD(a δ_x + (1 - a) r, p)`` computed for a deterministic draft of ``x``)."""
    batch = target.shape[0]
    device = target.device
    rows = torch.arange(batch, device=device)
    tokens = node_tokens.long()
    cur = torch.zeros(batch, dtype=torch.long, device=device)
    num_accepted = torch.zeros(batch, dtype=torch.long, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    p = target[:, 0].clone()  # [B, V]
    accepted_nodes = torch.full((batch, max_depth), -1, dtype=torch.long, device=device)
    out_tokens = torch.full((batch, max_depth + 1), -1, dtype=torch.long, device=device)
    moved_mass = torch.zeros(batch, max_depth + 1, device=device)
    num_slots = children.shape[2]
    for depth in range(max_depth):
        moved = torch.zeros(batch, dtype=torch.bool, device=device)
        seen = torch.full((batch, num_slots), -1, dtype=torch.long, device=device)  # candidates_set
        first = children[rows, cur, 0].clamp_min(0)  # [B] first child: its proposal is unconditioned
        for slot in range(num_slots):
            child = children[rows, cur, slot]
            node = child.clamp_min(0)
            x = tokens[rows, node]
            tested = active & ~moved & (child >= 0)
            if dedupe:
                tested &= ~(seen == x[:, None]).any(-1)
                seen[:, slot] = torch.where(tested, x, -1)
            q = None if draft_probs is None else draft_probs[rows, node].float()  # [B, V]
            ratio, state = accept_prob(p, x, q)
            a = ratio
            if qx_from is not None:
                qx = torch.ones_like(ratio)  # official dynamic trees; also deterministic drafts (q one-hot)
                if qx_from == "first-sibling" and draft_probs is not None:
                    qx = draft_probs[rows, first].float().gather(1, x[:, None])[:, 0]
                if skip_zero_q:
                    tested &= qx > 0
                a = ratio / qx
            u = uniform[rows, node]
            accept = tested & ((u < a) if strict else (u <= a))
            reject = tested & ~accept
            after = residual(p, x, q, state)  # [B, V]
            # moved_mass: TVD(a delta_x + (1 - a) residual, p) for a deterministic draft x (q one-hot,
            # qx = 1): the committed token's law when drafts are deterministic, independent of q otherwise.
            if q is None:
                a_det, after_det = a, after
            else:
                a_det, state_det = accept_prob(p, x, None)
                after_det = residual(p, x, None, state_det)
            a_det = torch.nan_to_num(a_det, nan=0.0).clamp(0.0, 1.0)
            law = ((1 - a_det)[:, None] * after_det).scatter_add(1, x[:, None], a_det[:, None])
            moved_mass[:, depth] += torch.where(tested, 0.5 * (law - p).abs().sum(-1), 0.0)
            p = torch.where(accept[:, None], target[rows, node], torch.where(reject[:, None], after, p))
            accepted_nodes[:, depth] = torch.where(accept, child, accepted_nodes[:, depth])
            out_tokens[:, depth] = torch.where(accept, x, out_tokens[:, depth])
            cur = torch.where(accept, node, cur)
            moved |= accept
        active &= moved
        num_accepted += moved.long()
    return TreeWalk(num_accepted, accepted_nodes, cur, out_tokens, p, moved_mass)


def _as_tree(draft: Draft, uniform: torch.Tensor) -> tuple[torch.Tensor, DraftTree, torch.Tensor | None, torch.Tensor]:
    """A chain draft as a tree (node i = draft i - 1): ``(tokens [B, k+1], tree, draft_probs, uniform [B, k+1])``;
    chain target rows already are the node rows."""
    batch, k = draft.tokens.shape
    tokens = torch.cat([draft.tokens.new_zeros(batch, 1), draft.tokens], dim=1)
    q = draft.draft_probs
    if q is not None:
        q = torch.cat([q.new_zeros(batch, 1, q.shape[-1]), q], dim=1)
    uniform = torch.cat([uniform.new_zeros(batch, 1), uniform], dim=1)
    return tokens, DraftTree.chain(k, batch).to(draft.tokens.device), q, uniform


def _finish(draft: Draft, walk: TreeWalk, uniform_sample: torch.Tensor, chain: bool) -> Verdict:
    """Draw the recovered or bonus token from the walk's final distribution (inverse CDF, the same
    rule as every other rule) and build the verdict."""
    batch = walk.num_accepted.shape[0]
    _, final = chain_rejection_sample(
        walk.tokens[:, :0], None, walk.residual[:, None], uniform_sample.new_zeros(batch, 0), uniform_sample
    )
    walk.tokens.scatter_(1, walk.num_accepted[:, None], final)
    if chain:
        k = draft.tokens.shape[1]
        return Verdict(walk.num_accepted, walk.tokens, walk.num_accepted == k, moved_mass=walk.moved_mass)
    is_bonus = draft.tree.children[torch.arange(batch, device=walk.node.device), walk.node, 0] < 0
    return Verdict(
        walk.num_accepted, walk.tokens, is_bonus, accepted_nodes=walk.accepted_nodes, moved_mass=walk.moved_mass
    )


def _walk(
    draft: Draft, target: torch.Tensor, uniform_accept: torch.Tensor, uniform_sample: torch.Tensor, **walk_options
) -> Verdict:
    chain = draft.tree is None
    if chain:
        tokens, tree, q, uniform = _as_tree(draft, uniform_accept)
    else:
        tokens, tree, q, uniform = draft.tokens, draft.tree, draft.draft_probs, uniform_accept
    walk = official_tree_walk(tokens, tree.children, q, target, uniform, tree.max_depth, **walk_options)
    return _finish(draft, walk, uniform_sample, chain)


def verify_lantern_official(
    draft: Draft,
    target: torch.Tensor,
    uniform_accept: torch.Tensor,
    uniform_sample: torch.Tensor,
    *,
    neighbours: torch.Tensor,
    k: int,
    limit: float,
    relative: bool,
    path: str,
) -> Verdict:
    """LANTERN's sampling verification as the official code runs it (module docstring). ``target``
    ``[B, k+1, V]`` (chain) / ``[B, N, V]`` (tree); ``uniform_accept`` ``[B, k]`` / ``[B, N]``;
    ``uniform_sample`` ``[B]``. Chains run as one-branch trees of the same path."""
    path = _resolve_path(path, draft.draft_probs)

    def accept_prob(p, x, q):
        mass, counted = lantern_official_mass(p, x, neighbours, k, limit, relative)
        return p.gather(1, x[:, None])[:, 0] + mass, counted  # px; the walk divides by qx

    def residual(p, x, q, counted):
        return lantern_official_residual(p, x, q, neighbours, k, counted, path)

    static = path != "dynamic"
    return _walk(
        draft,
        target,
        uniform_accept,
        uniform_sample,
        accept_prob=accept_prob,
        residual=residual,
        qx_from="first-sibling" if static else "one",
        dedupe=True,
        skip_zero_q=static,
        strict=False,
    )


def verify_gsd_official(
    draft: Draft,
    target: torch.Tensor,
    uniform_accept: torch.Tensor,
    uniform_sample: torch.Tensor,
    *,
    embeddings: torch.Tensor,
    group_size: int,
    prob_threshold: float,
    dist_threshold: float,
) -> Verdict:
    """GSD's acceptance as ``SpeculativeSampler.__call__`` runs it on a chain (module docstring);
    trees (not in the official code, which verifies Jacobi chains) apply the same test to each
    sibling in turn, each rejection continuing from ``norm(max(0, p - q))``."""

    def accept_prob(p, x, q):
        return gsd_official_accept_prob(p, x, q, embeddings, group_size, prob_threshold, dist_threshold), None

    def residual(p, x, q, state):
        return gsd_official_residual(p, x, q)

    return _walk(
        draft,
        target,
        uniform_accept,
        uniform_sample,
        accept_prob=accept_prob,
        residual=residual,
        qx_from=None,
        strict=True,
    )


def _preorder_rank(tree: DraftTree) -> torch.Tensor:
    """``[B, N]`` depth-first (preorder) rank of every node, children in slot order: the order of the
    official ``retrieve_indices`` paths. Host loop, deliberate: trees are small and built per draft."""
    children = tree.children.cpu().tolist()
    ranks = torch.zeros(tree.parents.shape, dtype=torch.long)
    for b, kids in enumerate(children):
        stack, rank = [0], 0
        while stack:
            node = stack.pop()
            ranks[b, node] = rank
            rank += 1
            stack.extend(c for c in reversed(kids[node]) if c >= 0)
    return ranks.to(tree.parents.device)


def verify_lantern_official_greedy(
    draft: Draft,
    target: torch.Tensor,
    *,
    neighbours: torch.Tensor,
    k: int,
    limit: float,
    relative: bool,
) -> Verdict:
    """LANTERN's greedy mode (module docstring). ``target``: softmax at temperature 1 of the logits,
    ``[B, k+1, V]`` / ``[B, N, V]``. Chains keep drafts while :func:`lantern_official_greedy_pass`
    holds; trees take the deepest node whose whole path passes (first in path order on ties). The
    next token is the target's argmax there. ``moved_mass``: 1 where an accepted draft is not the
    argmax (one-hot laws), else 0."""
    batch = draft.tokens.shape[0]
    device = target.device
    vocab = target.shape[-1]
    rows = torch.arange(batch, device=device)
    best = target.argmax(-1)  # [B, T]
    if draft.tree is None:
        num = draft.tokens.shape[1]
        passed = lantern_official_greedy_pass(
            target[:, :num].reshape(batch * num, vocab), draft.tokens.reshape(-1), neighbours, k, limit, relative
        )
        passed = passed.view(batch, num)
        num_accepted = passed.long().cumprod(1).sum(1)
        positions = torch.arange(num + 1, device=device)[None]
        tokens = torch.where(positions < num_accepted[:, None], F.pad(draft.tokens, (0, 1), value=-1), -1)
        tokens.scatter_(1, num_accepted[:, None], best.gather(1, num_accepted[:, None]))
        off = (draft.tokens != best[:, :num]) & (positions[:, :num] < num_accepted[:, None])
        moved = F.pad(off.float(), (0, 1))
        return Verdict(num_accepted, tokens, num_accepted == num, moved_mass=moved)
    tree = draft.tree
    num_nodes = tree.num_nodes
    parent = tree.parents.clamp_min(0)  # [B, N]
    parent_p = target.gather(1, parent[..., None].expand(-1, -1, vocab))  # [B, N, V]
    passed = lantern_official_greedy_pass(
        parent_p.reshape(-1, vocab), draft.tokens.reshape(-1), neighbours, k, limit, relative
    ).view(batch, num_nodes)
    alive = torch.zeros(batch, num_nodes, dtype=torch.bool, device=device)
    alive[:, 0] = True
    for n in range(1, num_nodes):  # parents precede children
        alive[:, n] = passed[:, n] & alive[rows, parent[:, n]]
    rank = _preorder_rank(tree)
    key = torch.where(alive, tree.depth * (num_nodes + 1) + (num_nodes - rank), -1)
    node = key.argmax(-1)  # [B] deepest alive node, first in path order
    num_accepted = tree.depth[rows, node]
    accepted_nodes = torch.full((batch, tree.max_depth), -1, dtype=torch.long, device=device)
    walker = node.clone()
    for _ in range(tree.max_depth):
        d = tree.depth[rows, walker]
        on_path = d > 0
        accepted_nodes.scatter_(
            1,
            (d - 1).clamp_min(0)[:, None],
            torch.where(on_path, walker, accepted_nodes.gather(1, (d - 1).clamp_min(0)[:, None])[:, 0])[:, None],
        )
        walker = torch.where(on_path, parent[rows, walker], walker)
    tokens = torch.full((batch, tree.max_depth + 1), -1, dtype=torch.long, device=device)
    tokens[:, : tree.max_depth] = torch.where(
        accepted_nodes >= 0, draft.tokens.gather(1, accepted_nodes.clamp_min(0)), -1
    )
    tokens.scatter_(1, num_accepted[:, None], best[rows, node][:, None])
    path_best = best.gather(1, parent.gather(1, accepted_nodes.clamp_min(0)))  # [B, D] argmax at each parent
    off = (accepted_nodes >= 0) & (tokens[:, : tree.max_depth] != path_best)
    moved = F.pad(off.float(), (0, 1))
    return Verdict(
        num_accepted, tokens, tree.children[rows, node, 0] < 0, accepted_nodes=accepted_nodes, moved_mass=moved
    )
