"""The official LANTERN / LANTERN++ / GSD variants (``variant="official"``) against an independent,
plain transcription of the authors' code, and the empty-draft edge case for every rule.

The transcriptions below follow, row by row and with Python loops, the functions they name:
``jadohu/LANTERN`` ``entrypoints/generate_codebook.py`` (neighbour tables),
``models/ea_model_llamagen.py::evaluate_posterior`` (dynamic trees, sampling and greedy branches),
``::evaluate_posterior_v1`` (static trees, LlamaGen) and ``models/ea_model_lumina_mgpt.py::evaluate_posterior``
(static trees, Lumina-mGPT); ``junhyukso/GSD`` ``scheduler/jacobi_iteration_lumina_mgpt.py::
SpeculativeSampler.__call__`` and ``reject_sampling_single_token``. They share no code with
``mmspec.relaxed_official``.
"""

import pytest
import torch
import torch.nn.functional as F

from mmspec.pipelines.llamagen.pipeline_llamagen import LlamaGenPipeline
from mmspec.relaxed import (
    GSDAcceptance,
    LanternAcceptance,
    build_latent_neighbours,
    load_or_build_neighbours,
)
from mmspec.relaxed_official import (
    gsd_official_accept_prob,
    gsd_official_residual,
    gsd_official_window,
    lantern_official_mass,
    lantern_official_residual,
)
from mmspec.rules import get_acceptance_rule
from mmspec.tree import DraftTree
from mmspec.types import Categorical, Draft

from ..conftest import tiny_llamagen

V = 48
PARENTS = [-1, 0, 0, 0, 1, 1, 2, 4]  # root -> {1, 2, 3}; 1 -> {4, 5}; 2 -> {6}; 4 -> {7}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _official_table(codebook):
    """generate_codebook.py: cdist of the raw rows, diagonal inf, all V - 1 neighbours nearest first."""
    distances = torch.cdist(codebook, codebook, p=2)
    distances.fill_diagonal_(float("inf"))
    _, topk_indices = torch.topk(distances, codebook.shape[0] - 1, dim=-1, largest=False)
    return topk_indices


@pytest.fixture(scope="module")
def codebook():
    return torch.randn(V, 3, generator=_gen(11)) * torch.linspace(0.8, 1.2, V)[:, None]


@pytest.fixture(scope="module")
def nearest(codebook):
    return _official_table(codebook)


# --------------------------------------------------------------------------------------------
# Transcriptions of the official code (one row at a time)
# --------------------------------------------------------------------------------------------


def _lantern_px(gtp, xi, nearest, lantern_k, lantern_delta):
    """The ``if lantern:`` block of evaluate_posterior(_v1): returns (px, indices)."""
    px = gtp[xi]
    nearest_probs = gtp[nearest[xi, :lantern_k]].reshape(lantern_k, 1)
    cumsum_nearest_probs = torch.cumsum(nearest_probs, dim=0)
    if lantern_delta > 1.0:
        indices = (cumsum_nearest_probs <= (lantern_delta - 1) * px).nonzero(as_tuple=True)[0]
    else:
        indices = (cumsum_nearest_probs <= lantern_delta).nonzero(as_tuple=True)[0]
    indices = -1 if indices.numel() == 0 else indices[-1]
    if indices != -1:
        px = px + cumsum_nearest_probs[indices]
    return float(px), indices


def _lantern_reject(gtp, xi, indices, nearest, lantern_k, path, q=None):
    """The rejection branch: returns the new gtp (normalised)."""
    gtp = gtp.clone()
    if path == "dynamic":
        gtp[xi] = 0
        if indices != -1:
            gtp[nearest[xi, : lantern_k + 1]] = 0
    elif path == "static-llamagen":
        q = q.clone()
        if indices != -1:
            q[nearest[xi, : lantern_k + 1]] = 0
        gtp = gtp - q
        gtp[gtp < 0] = 0
    else:  # static-lumina
        if indices != -1:
            gtp[nearest[xi, : lantern_k + 1]] = 0
        gtp = gtp - q
        gtp[gtp < 0] = 0
    if gtp.sum() == 0:
        gtp = torch.ones_like(gtp)
    return gtp / gtp.sum()


def _leaf_paths(parents):
    """retrieve_indices: every root-to-leaf path, sorted by its node indices."""
    kids = {n: [c for c in range(len(parents)) if parents[c] == n] for n in range(len(parents))}
    paths, stack = [], [[0]]
    while stack:
        path = stack.pop()
        if not kids[path[-1]]:
            paths.append(path)
        stack.extend(path + [c] for c in kids[path[-1]])
    return sorted(paths)


def _earlier_siblings(parents, node):
    return [c for c in range(1, node) if parents[c] == parents[node]]


def _official_lantern_sampling(tokens, parents, target, proposals, rs, nearest, lantern_k, lantern_delta, path):
    """evaluate_posterior (dynamic) / evaluate_posterior_v1 (static) for one row.
    tokens [N], target [N, V], proposals [N, V] (node n: the drafter's distribution for n's children,
    unconditioned) or None, rs [N] the uniform of each node. Returns (accepted tokens, sample_p)."""
    paths = _leaf_paths(parents)
    width = max(len(p) for p in paths)
    candidates = [[int(tokens[n]) for n in p] + [-1] * (width - len(p)) for p in paths]
    nodes = [p + [-1] * (width - len(p)) for p in paths]
    accept_length, accept_cand, best_candidate = 1, candidates[0][:1], 0
    adjustflag = False
    for i in range(1, width):
        if i != accept_length:
            break
        adjustflag = False
        is_eq = [c[:accept_length] == accept_cand for c in candidates]
        fi = is_eq.index(True)
        gtp = target[nodes[fi][i - 1]].clone()
        candidates_set = []
        for j in range(len(candidates)):
            if not is_eq[j]:
                continue
            xi = candidates[j][i]
            if xi in candidates_set or xi == -1:
                continue
            candidates_set.append(xi)
            node = nodes[j][i]
            r = float(rs[node])
            px, indices = _lantern_px(gtp, xi, nearest, lantern_k, lantern_delta)
            q = None
            if path == "dynamic" or proposals is None:
                qx = 1.0
                q = F.one_hot(torch.tensor(xi), target.shape[-1]).float()
            else:
                qx = float(proposals[parents[node], xi])  # cart_candidates_prob
                if qx <= 0:
                    continue
                q = proposals[parents[node]].clone()  # op[i - 1][p_indices[j][i]]
                b = [int(tokens[s]) for s in _earlier_siblings(parents, node)]
                if len(b) > 0:
                    q[b] = 0
                    q = q / q.sum()
            if r <= px / qx:
                accept_cand = accept_cand + [xi]
                accept_length += 1
                best_candidate = j
                break
            gtp = _lantern_reject(gtp, xi, indices, nearest, lantern_k, path, q)
            adjustflag = True
    if adjustflag and accept_length != width:
        sample_p = gtp
    else:
        sample_p = target[nodes[best_candidate][accept_length - 1]]
    return accept_cand[1:], sample_p


def _official_lantern_greedy(tokens, parents, target, nearest, lantern_k, lantern_delta):
    """The ``logits_processor is None`` branch with ``lantern=True`` for one row; target = softmax of
    the logits. Returns (accepted tokens, next token)."""
    paths = _leaf_paths(parents)
    width = max(len(p) for p in paths)
    candidates = torch.tensor([[int(tokens[n]) for n in p] + [-1] * (width - len(p)) for p in paths])
    nodes = torch.tensor([p + [p[-1]] * (width - len(p)) for p in paths])
    logits = target[nodes].log()  # [paths, width, V]
    gtp = torch.softmax(logits, dim=-1)
    xi = candidates[:, 1:]
    valid_mask = xi != -1
    xi_valid = xi.clone()
    xi_valid[~valid_mask] = 0
    px = gtp.gather(dim=-1, index=xi_valid.unsqueeze(-1)).squeeze(-1) * valid_mask
    nearest_indices = nearest[xi_valid][:, :, :lantern_k].clone()
    nearest_indices[~valid_mask.unsqueeze(-1).expand_as(nearest_indices)] = 0
    nearest_probs = gtp.gather(dim=-1, index=nearest_indices) * valid_mask.unsqueeze(-1)
    cumsum_nearest_probs = torch.cumsum(nearest_probs, dim=-1)
    px_expanded = px.unsqueeze(-1).repeat(1, 1, lantern_k)
    approx_p = (px_expanded + cumsum_nearest_probs) * valid_mask.unsqueeze(-1)
    target_p = torch.cat([px_expanded, nearest_probs], dim=-1) * valid_mask.unsqueeze(-1).float()
    approx_p_full = torch.cat([approx_p, torch.zeros_like(nearest_probs)], dim=-1) * valid_mask.unsqueeze(-1).float()
    tvd = torch.nan_to_num(0.5 * torch.abs(target_p - approx_p_full), nan=0.0)
    tvd = tvd[:, :, :lantern_k] + torch.cumsum(tvd[:, :, lantern_k:], dim=-1)
    tvd[~valid_mask] = float("inf")
    if lantern_delta > 1.0:
        tvd_not_exceeds = tvd <= (lantern_delta - 1) * px.unsqueeze(-1)
    else:
        tvd_not_exceeds = tvd <= lantern_delta
    indices = torch.arange(tvd.shape[-1]).expand_as(tvd)
    indices = torch.where(tvd_not_exceeds, indices, torch.full_like(indices, -1)).max(dim=-1)[0]
    idx_mask = indices >= 0
    idx_values = (indices * idx_mask).unsqueeze(-1)
    px_adjusted = torch.where(idx_mask, approx_p.gather(dim=-1, index=idx_values).squeeze(-1), px) * valid_mask
    gtp.scatter_(dim=-1, index=xi_valid.unsqueeze(-1), src=px_adjusted.unsqueeze(-1))
    top_tokens = torch.argmax(gtp, dim=-1)[:, :-1]
    posterior_mask = (xi == top_tokens).int() * valid_mask
    candidates_accept_length = torch.cumprod(posterior_mask, dim=1).sum(dim=1)
    accept_length = int(candidates_accept_length.max())
    best = 0 if accept_length == 0 else int(torch.argmax(candidates_accept_length))
    next_token = int(torch.argmax(logits[best, accept_length]))
    return candidates[best, 1 : accept_length + 1].tolist(), next_token


def _official_gsd_final_p(adv_prob, draft_prob, adv_logits, cls_idx, head_img_sims, p_thr, d_thr):
    """SpeculativeSampler.__call__'s acceptance probability for one token."""
    logit_sort = adv_logits.sort(dim=-1).indices
    cur_idx = int(torch.nonzero(logit_sort == cls_idx))
    logit_sort_idx = logit_sort[cur_idx - 7 : cur_idx + 7]
    try:
        adv_super_prob = adv_prob[logit_sort_idx]
        draft_super_prob = draft_prob[logit_sort_idx]
        is_in_p_thr = ((adv_super_prob - adv_prob[cls_idx]).abs() < p_thr).float()
        if logit_sort_idx.max().item() <= 10000:
            is_in_d_thr = (head_img_sims[cls_idx][logit_sort_idx] < d_thr).float()
        else:
            is_in_d_thr = 1.0
        final_mask = (is_in_p_thr * is_in_d_thr).float()
        final_p = ((adv_super_prob * final_mask).sum() / (draft_super_prob * final_mask).sum()).clamp(max=1)
    except RuntimeError:  # max() of an empty slice
        final_p = (adv_prob[cls_idx] / draft_prob[cls_idx]).clamp(max=1)
    return float(final_p)


def _head_img_sims(a):
    return (torch.sum(a**2, dim=-1, keepdim=True) + torch.sum(a.T**2, dim=0, keepdim=True)) - 2 * a @ a.T


def _official_residual_gsd(adv_prob, draft_prob):
    """reject_sampling_single_token without logits processors: softmax(log(max(0, p - q)))."""
    return F.softmax((adv_prob - draft_prob).clamp(min=0).log(), dim=-1)


def _inverse_cdf(weights, u):
    """mmspec's sampling rule (kernels/rejection.py): first j with cumsum > u * total."""
    cdf = weights.double().cumsum(0)
    above = (cdf > float(u) * cdf[-1]).nonzero()
    return int(above[0]) if above.numel() else int((weights > 0).nonzero()[-1])


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _tree_inputs(seed, batch, nearest, with_proposals):
    """Targets [B, N, V]; every parent's unconditioned proposal; distinct sibling tokens drawn from
    it; mmspec's draft_probs = the proposal with earlier siblings removed (renormalised)."""
    g = _gen(seed)
    num_nodes = len(PARENTS)
    target = torch.softmax(torch.randn(batch, num_nodes, V, generator=g) * 2.5, -1)
    proposals = torch.softmax(torch.randn(batch, num_nodes, V, generator=g) * 2.0 + target.log(), -1)
    tokens = torch.zeros(batch, num_nodes, dtype=torch.long)
    draft_probs = torch.zeros(batch, num_nodes, V)
    for b in range(batch):
        for n in range(1, num_nodes):
            q = proposals[b, PARENTS[n]].clone()
            earlier = [int(tokens[b, s]) for s in _earlier_siblings(PARENTS, n)]
            q[earlier] = 0
            q = q / q.sum()
            draft_probs[b, n] = q
            tokens[b, n] = int(torch.multinomial(q, 1, generator=g))
    tree = DraftTree.from_parents(torch.tensor(PARENTS)[None].expand(batch, -1).contiguous())
    return target, proposals, Draft(tokens, draft_probs if with_proposals else None, tree)


# --------------------------------------------------------------------------------------------
# LANTERN: acceptance, residuals, the whole verification
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("official_delta", [0.05, 0.3, 3.0])
def test_lantern_official_acceptance_matches_transcription(nearest, official_delta):
    g = _gen(1)
    p = torch.softmax(torch.randn(256, V, generator=g) * 2, -1)
    x = torch.randint(0, V, (256,), generator=g)
    lantern_k = 10
    relative = official_delta > 1
    mass, counted = lantern_official_mass(
        p, x, nearest, lantern_k, official_delta - 1 if relative else official_delta, relative
    )
    for r in range(256):
        px, indices = _lantern_px(p[r], int(x[r]), nearest, lantern_k, official_delta)
        assert float(p[r, x[r]] + mass[r]) == pytest.approx(px, abs=1e-6)
        assert bool(counted[r]) == (indices != -1)
    assert 0 < int(counted.sum()) < 256  # both branches exercised


@pytest.mark.parametrize("path", ["dynamic", "static-llamagen", "static-lumina"])
def test_lantern_official_residual_per_tree_type_matches_transcription(nearest, path):
    g = _gen(2)
    p = torch.softmax(torch.randn(128, V, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(128, V, generator=g) * 2, -1)
    x = torch.randint(0, V, (128,), generator=g)
    lantern_k = 6
    _, counted = lantern_official_mass(p, x, nearest, lantern_k, 0.2)
    ours = lantern_official_residual(p, x, None if path == "dynamic" else q, nearest, lantern_k, counted, path)
    for r in range(128):
        _, indices = _lantern_px(p[r], int(x[r]), nearest, lantern_k, 0.2)
        expected = _lantern_reject(p[r], int(x[r]), indices, nearest, lantern_k, path, q[r])
        torch.testing.assert_close(ours[r], expected, atol=1e-6, rtol=0)


def test_lantern_official_residual_all_zero_is_uniform(nearest):
    p = F.one_hot(torch.tensor([3]), V).float()
    out = lantern_official_residual(p, torch.tensor([3]), None, nearest, 2, torch.tensor([False]), "dynamic")
    torch.testing.assert_close(out, torch.full((1, V), 1 / V))


@pytest.mark.parametrize("path", ["dynamic", "static-llamagen", "static-lumina"])
@pytest.mark.parametrize("official_delta", [0.2, 3.0])
def test_lantern_official_tree_verification_matches_transcription(nearest, path, official_delta):
    batch, lantern_k = 96, 5
    target, proposals, draft = _tree_inputs(3, batch, nearest, with_proposals=path != "dynamic")
    options = {"mode": "multiplicative", "lam": official_delta} if official_delta > 1 else {"delta": official_delta}
    rule = LanternAcceptance(nearest, k=lantern_k, variant="official", official_path=path, **options)
    verdict = rule.verify(draft, Categorical(target), _gen(5))
    g = _gen(5)
    rs = torch.rand(batch, len(PARENTS), generator=g)
    us = torch.rand(batch, generator=g)
    lengths = []
    for b in range(batch):
        accepted, sample_p = _official_lantern_sampling(
            draft.tokens[b],
            PARENTS,
            target[b],
            None if path == "dynamic" else proposals[b],
            rs[b],
            nearest,
            lantern_k,
            official_delta,
            path,
        )
        n = len(accepted)
        lengths.append(n)
        assert int(verdict.num_accepted[b]) == n
        assert verdict.tokens[b, :n].tolist() == accepted
        assert int(verdict.tokens[b, n]) == _inverse_cdf(sample_p, us[b])
    assert len(set(lengths)) > 1  # accepted and rejected paths both exercised


@pytest.mark.parametrize("path", ["dynamic", "static-llamagen"])
def test_lantern_official_chain_is_the_one_branch_tree(nearest, path):
    """Chains run through the same official loop (a chain is a tree with one child per node)."""
    batch, k, lantern_k = 64, 4, 5
    g = _gen(8)
    target = torch.softmax(torch.randn(batch, k + 1, V, generator=g) * 2.5, -1)
    q = torch.softmax(torch.randn(batch, k, V, generator=g) + target[:, :k].log(), -1)
    tokens = torch.multinomial(q.reshape(-1, V), 1, generator=g).view(batch, k)
    with_q = path != "dynamic"
    rule = LanternAcceptance(nearest, k=lantern_k, delta=0.25, variant="official", official_path=path)
    verdict = rule.verify(Draft(tokens, q if with_q else None), Categorical(target), _gen(9))
    g = _gen(9)
    rs = torch.rand(batch, k, generator=g)
    us = torch.rand(batch, generator=g)
    chain = list(range(-1, k))
    for b in range(batch):
        proposals = torch.cat([q[b], q[b, :1]]) if with_q else None  # node n's children drawn from q[b, n]
        accepted, sample_p = _official_lantern_sampling(
            torch.cat([torch.zeros(1, dtype=torch.long), tokens[b]]),
            chain,
            target[b],
            proposals,
            torch.cat([torch.zeros(1), rs[b]]),
            nearest,
            lantern_k,
            0.25,
            path,
        )
        n = len(accepted)
        assert int(verdict.num_accepted[b]) == n and verdict.tokens[b, :n].tolist() == accepted
        assert int(verdict.tokens[b, n]) == _inverse_cdf(sample_p, us[b])


def test_lantern_official_and_default_residuals_differ(nearest):
    """The point of the option: after a rejection the official dynamic residual zeroes k + 1 listed
    neighbours, mmspec's default only the counted ones."""
    g = _gen(4)
    p = torch.softmax(torch.randn(64, V, generator=g) * 2, -1)
    x = torch.randint(0, V, (64,), generator=g)
    _, counted = lantern_official_mass(p, x, nearest, 8, 0.3)
    official = lantern_official_residual(p, x, None, nearest, 8, counted, "dynamic")
    default, _ = LanternAcceptance(nearest, k=8, delta=0.3).relaxed_target(p, x, None)
    default = default.scatter(1, x[:, None], 0.0)
    default = default / default.sum(-1, keepdim=True)
    assert float(0.5 * (official - default).abs().sum(-1).mean()) > 0.01


@pytest.mark.parametrize("official_delta", [0.3, 3.0])
@pytest.mark.parametrize("kind", ["chain", "tree"])
def test_lantern_official_greedy_matches_transcription(nearest, official_delta, kind):
    batch, lantern_k = 64, 8
    g = _gen(6)
    parents = PARENTS if kind == "tree" else [-1, 0, 1, 2, 3]
    num_nodes = len(parents)
    target = torch.softmax(torch.randn(batch, num_nodes, V, generator=g) * 1.5, -1)
    tokens = torch.zeros(batch, num_nodes, dtype=torch.long)
    for b in range(batch):  # first child: the argmax; then one of its nearest neighbours; then random
        for n in range(1, num_nodes):
            top = int(target[b, parents[n]].argmax())
            choice = len(_earlier_siblings(parents, n))
            options = [
                top,
                int(nearest[top, int(torch.randint(0, 3, (1,), generator=g))]),
                int(torch.randint(0, V, (1,), generator=g)),
            ]
            token = options[choice] if torch.rand(1, generator=g) < 0.8 else options[2]
            while token in [int(tokens[b, s]) for s in _earlier_siblings(parents, n)]:
                token = (token + 1) % V
            tokens[b, n] = token
    options = {"mode": "multiplicative", "lam": official_delta} if official_delta > 1 else {"delta": official_delta}
    rule = LanternAcceptance(nearest, k=lantern_k, variant="official", greedy=True, **options)
    assert rule.requires_greedy
    if kind == "tree":
        tree = DraftTree.from_parents(torch.tensor(parents)[None].expand(batch, -1).contiguous())
        verdict = rule.verify(Draft(tokens, None, tree), Categorical(target), None)
    else:
        verdict = rule.verify(Draft(tokens[:, 1:]), Categorical(target), None)
    lengths = []
    for b in range(batch):
        accepted, next_token = _official_lantern_greedy(
            tokens[b], parents, target[b], nearest, lantern_k, official_delta
        )
        n = len(accepted)
        lengths.append(n)
        assert int(verdict.num_accepted[b]) == n, b
        assert verdict.tokens[b, :n].tolist() == accepted
        assert int(verdict.tokens[b, n]) == next_token
    assert len(set(lengths)) > 2


def test_lantern_official_greedy_reads_temperature_one_probs():
    from mmspec.sampling import SamplingConfig

    table = torch.stack([torch.roll(torch.arange(V), -i)[1:] for i in range(V)])
    rule = LanternAcceptance(table, k=4, variant="official", greedy=True)
    assert rule.target_sampling(SamplingConfig(temperature=0.0, guidance_scale=3.0)) == SamplingConfig(
        temperature=1.0, guidance_scale=3.0
    )
    plain = LanternAcceptance(table, k=4, variant="official")
    greedy = SamplingConfig(temperature=0.0)
    assert plain.target_sampling(greedy) is greedy and not plain.requires_greedy


# --------------------------------------------------------------------------------------------
# GSD
# --------------------------------------------------------------------------------------------


def test_gsd_official_acceptance_matches_transcription_including_the_wrap(codebook):
    g = _gen(7)
    rows = 300
    logits = torch.randn(rows, V, generator=g) * 1.5
    p = torch.softmax(logits, -1)
    q = torch.softmax(torch.randn(rows, V, generator=g) + logits, -1)
    x = torch.multinomial(q, 1, generator=g)[:, 0]
    ascending = logits.argsort(-1)
    x[:50] = ascending[torch.arange(50), torch.arange(50) % 7]  # the 7 lowest-ranked tokens: the empty slice
    x[50:60] = ascending[torch.arange(50, 60), torch.arange(10) % 7 + 7]  # just above them: a full window
    sims = _head_img_sims(codebook)
    ours = gsd_official_accept_prob(p, x, q, codebook, 14, 0.15, 3.0)
    grouped_differ = 0
    for r in range(rows):
        expected = _official_gsd_final_p(p[r], q[r], logits[r], int(x[r]), sims, 0.15, 3.0)
        assert float(ours[r]) == pytest.approx(expected, abs=1e-6)
        plain = min(1.0, float(p[r, x[r]] / q[r, x[r]]))
        if r < 50:
            assert expected == pytest.approx(plain, abs=1e-6)  # the wrap falls back to p/q
        elif abs(expected - plain) > 1e-4:
            grouped_differ += 1
    assert grouped_differ > 20
    window = gsd_official_window(p, x, 14)
    assert bool((window[:50] < 0).all()) and bool((window[50:60] >= 0).all())


def test_gsd_official_window_slices_like_python():
    """Python slice semantics, including a tiny vocabulary where the wrapped slice is not empty."""
    for vocab in (10, 14, 20):
        logits = torch.randn(vocab, generator=_gen(vocab))
        order = logits.sort().indices
        for pos in range(vocab):
            expected = order[pos - 7 : pos + 7].tolist()
            got = gsd_official_window(torch.softmax(logits, -1)[None], order[pos : pos + 1], 14)[0]
            assert [int(t) for t in got if t >= 0] == expected, (vocab, pos)


def test_gsd_official_residual_matches_transcription():
    g = _gen(12)
    p = torch.softmax(torch.randn(64, V, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(64, V, generator=g) * 2, -1)
    x = torch.randint(0, V, (64,), generator=g)
    ours = gsd_official_residual(p, x, q)
    for r in range(64):
        torch.testing.assert_close(ours[r], _official_residual_gsd(p[r], q[r]), atol=1e-6, rtol=0)
    deterministic = gsd_official_residual(p, x, None)  # q one-hot: p without x
    torch.testing.assert_close(deterministic, p.scatter(1, x[:, None], 0.0) / (1 - p.gather(1, x[:, None])))


def test_gsd_official_chain_matches_transcription(codebook):
    batch, k = 80, 5
    g = _gen(13)
    logits = torch.randn(batch, k + 1, V, generator=g) * 2
    target = torch.softmax(logits, -1)
    q = torch.softmax(torch.randn(batch, k, V, generator=g) + logits[:, :k], -1)
    tokens = torch.multinomial(q.reshape(-1, V), 1, generator=g).view(batch, k)
    rule = GSDAcceptance(codebook, group_size=14, prob_threshold=0.15, dist_threshold=3.0, variant="official")
    verdict = rule.verify(Draft(tokens, q), Categorical(target), _gen(14))
    g = _gen(14)
    rs = torch.rand(batch, k, generator=g)
    us = torch.rand(batch, generator=g)
    sims = _head_img_sims(codebook)
    lengths = []
    for b in range(batch):
        n, sample_p = k, target[b, k]
        for i in range(k):
            cls_idx = int(tokens[b, i])
            final_p = _official_gsd_final_p(target[b, i], q[b, i], logits[b, i], cls_idx, sims, 0.15, 3.0)
            if not float(rs[b, i]) < final_p:
                n, sample_p = i, _official_residual_gsd(target[b, i], q[b, i])
                break
        lengths.append(n)
        assert int(verdict.num_accepted[b]) == n
        assert verdict.tokens[b, :n].tolist() == tokens[b, :n].tolist()
        assert int(verdict.tokens[b, n]) == _inverse_cdf(sample_p, us[b])
    assert len(set(lengths)) > 2


def test_official_variants_report_their_bound_and_options(codebook, nearest):
    lantern = LanternAcceptance(nearest, k=4, variant="official", official_path="static-lumina")
    gsd = GSDAcceptance(codebook, variant="official")
    for rule in (lantern, gsd):
        assert rule.bound.startswith("no bound: reproduces the official") and not rule.lossless
        assert "variant='official'" in repr(rule)
    assert "static-lumina" in repr(lantern)
    assert LanternAcceptance(nearest, k=4).bound == LanternAcceptance.bound
    with pytest.raises(ValueError, match="variant"):
        GSDAcceptance(codebook, variant="paper")
    with pytest.raises(ValueError, match="official_path"):
        LanternAcceptance(nearest, k=4, variant="official", official_path="static")
    with pytest.raises(ValueError, match="variant='official'"):
        LanternAcceptance(nearest, k=4, greedy=True)
    with pytest.raises(ValueError, match="k \\+ 1"):
        LanternAcceptance(nearest[:, :4], k=4, variant="official")


# --------------------------------------------------------------------------------------------
# Empty drafts: the bonus token only, for every rule
# --------------------------------------------------------------------------------------------


def _all_rules(codebook, nearest):
    yield "greedy", get_acceptance_rule("greedy")
    yield "exact", get_acceptance_rule("exact")
    yield "lantern", LanternAcceptance(nearest, k=5, delta=0.3)
    yield "lantern-greedy-neighbours", LanternAcceptance(nearest, k=5, delta=0.3, greedy_neighbours=2)
    yield "gsd", GSDAcceptance(codebook)
    for path in ("auto", "dynamic", "static-llamagen", "static-lumina"):
        yield (
            f"lantern-official-{path}",
            LanternAcceptance(nearest, k=5, delta=0.3, variant="official", official_path=path),
        )
    yield "lantern-official-greedy", LanternAcceptance(nearest, k=5, delta=0.3, variant="official", greedy=True)
    yield "gsd-official", GSDAcceptance(codebook, variant="official")


@pytest.mark.parametrize("kind", ["chain", "root-only tree"])
def test_every_rule_returns_the_bonus_token_only_for_an_empty_draft(codebook, nearest, kind):
    """vLLM's test_empty_sequence: no drafts -> one token, sampled from the target (here one-hot, so
    it is known), marked as a bonus."""
    batch = 3
    hot = torch.tensor([5, 0, V - 1])
    target = F.one_hot(hot, V).float()[:, None]  # [B, 1, V]
    if kind == "chain":
        draft = Draft(torch.zeros(batch, 0, dtype=torch.long), torch.zeros(batch, 0, V))
    else:
        draft = Draft(torch.zeros(batch, 1, dtype=torch.long), None, DraftTree.chain(0, batch))
    for name, rule in _all_rules(codebook, nearest):
        verdict = rule.verify(draft, Categorical(target), _gen(0))
        assert verdict.num_accepted.tolist() == [0] * batch, name
        assert verdict.tokens.tolist() == hot[:, None].tolist(), name
        assert verdict.is_bonus.all(), name
        if kind == "root-only tree":
            assert verdict.accepted_nodes.shape == (batch, 0), name
        if verdict.moved_mass is not None:
            assert verdict.moved_mass.tolist() == [[0.0]] * batch, name
    # and a soft target: the token is a sample of it (always inside its support)
    support = torch.zeros(batch, 1, V)
    support[:, :, 10:13] = 1 / 3
    for name, rule in _all_rules(codebook, nearest):
        verdict = rule.verify(draft if draft.tree is not None else Draft(draft.tokens), Categorical(support), _gen(1))
        assert bool(((verdict.tokens >= 10) & (verdict.tokens < 13)).all()), name


def test_root_only_tree_path_offsets():
    tree = DraftTree.chain(0, 2)
    assert tree.path_offsets(torch.zeros(2, 0, dtype=torch.long)).tolist() == [[0], [0]]


# --------------------------------------------------------------------------------------------
# Neighbour tables: raw (official) or normalised rows; pipeline
# --------------------------------------------------------------------------------------------


def test_neighbour_tables_from_raw_or_normalised_rows(codebook, tmp_path):
    official = _official_table(codebook)
    assert torch.equal(build_latent_neighbours(codebook, 10).long(), official[:, :10])
    normalised = build_latent_neighbours(codebook, 10, normalize=True)
    assert torch.equal(normalised, build_latent_neighbours(F.normalize(codebook, dim=-1), 10))
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(normalised, official[:, :10])) / (10 * V)
    assert overlap < 1.0  # the choice matters on a codebook whose row norms differ
    raw = load_or_build_neighbours(codebook, 10, tmp_path)
    norm = load_or_build_neighbours(codebook, 10, tmp_path, normalize=True)
    names = sorted(f.name for f in tmp_path.iterdir())
    assert len(names) == 2 and any("_raw_" in n for n in names) and any("_normalised_" in n for n in names)
    assert torch.equal(raw, build_latent_neighbours(codebook, 10)) and torch.equal(norm, normalised)
    single = tmp_path / "table.pt"
    load_or_build_neighbours(codebook, 10, single)
    with pytest.warns(UserWarning, match="raw codebook rows"):
        assert torch.equal(load_or_build_neighbours(codebook, 10, single, normalize=True), normalised)


@pytest.fixture(scope="module")
def pipe():
    gpt, vq = tiny_llamagen()
    pipe = LlamaGenPipeline(target=gpt, vq=vq)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_official_lantern_uses_raw_rows(pipe, tmp_path):
    raw = pipe.vq.quantize.embedding.weight.detach().float()
    rule = pipe.acceptance_rule("lantern", variant="official", k=5, neighbour_cache=tmp_path)
    assert torch.equal(rule.official_table.long(), _official_table(raw)[:, :6])
    default = pipe.acceptance_rule("lantern", k=5, neighbour_cache=tmp_path)
    assert torch.equal(default.neighbours, build_latent_neighbours(pipe.vq.codebook_embeddings().detach(), 5))
    chosen = pipe.acceptance_rule("lantern", k=5, neighbour_rows="raw", neighbour_cache=tmp_path)
    assert torch.equal(chosen.neighbours.long(), _official_table(raw)[:, :5])
    with pytest.raises(ValueError, match="neighbour_rows"):
        pipe.acceptance_rule("lantern", k=5, neighbour_rows="cosine", neighbour_cache=tmp_path)


def _generate(pipe, temperature, acceptance, options=None, speculative="sjd"):
    return pipe(
        class_labels=[0, 4, 2],
        guidance_scale=2.0,
        speculative=speculative,
        num_draft_tokens=3,
        temperature=temperature,
        acceptance=acceptance,
        acceptance_options=options,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )


def test_pipeline_official_greedy_without_relaxation_is_greedy_decoding(pipe, tmp_path):
    """Official greedy mode reads temperature-1 probabilities through AcceptanceRule.target_sampling;
    with delta = 0 nothing is relaxed, so it must reproduce greedy decoding token for token."""
    baseline = _generate(pipe, 0.0, "exact", speculative=None)
    official = _generate(
        pipe,
        0.0,
        "lantern",
        {"variant": "official", "greedy": True, "delta": 0.0, "k": 4, "neighbour_cache": str(tmp_path)},
    )
    assert torch.equal(official.tokens, baseline.tokens)
    relaxed = _generate(
        pipe,
        0.0,
        "lantern",
        {"variant": "official", "greedy": True, "delta": 0.9, "k": 4, "neighbour_cache": str(tmp_path)},
    )
    assert relaxed.stats.mean_accepted >= official.stats.mean_accepted
    with pytest.raises(ValueError, match="greedy"):
        _generate(pipe, 1.0, "lantern", {"variant": "official", "greedy": True, "neighbour_cache": str(tmp_path)})


@pytest.mark.parametrize("rule", ["lantern", "gsd"])
def test_pipeline_official_variants_run_and_relax(pipe, tmp_path, rule):
    options = {"variant": "official"}
    if rule == "lantern":
        options.update(delta=0.3, k=8, neighbour_cache=str(tmp_path))
    else:
        options.update(group_size=14, dist_threshold=2.0)
    exact = _generate(pipe, 1.0, "exact")
    out = _generate(pipe, 1.0, rule, options)
    assert out.tokens.shape == exact.tokens.shape
    assert float(out.stats.moved_mass_sum) > 0


def test_lantern_official_skips_a_repeated_sibling_token(nearest):
    """``candidates_set``: a token already tried at this level is skipped (no second test, no second
    residual step). Leaves only: with subtrees the official code would also merge the repeated
    token's subtrees (it matches paths by tokens), which mmspec's node-based trees do not."""
    parents = [-1, 0, 0, 0]
    batch = 128
    g = _gen(15)
    target = torch.softmax(torch.randn(batch, 4, V, generator=g) * 2, -1)
    proposals = torch.softmax(torch.randn(batch, 4, V, generator=g) * 2 + target.log(), -1)
    tokens = torch.multinomial(proposals[:, 0], 3, generator=g)
    tokens = torch.cat([torch.zeros(batch, 1, dtype=torch.long), tokens], 1)
    tokens[:, 2] = tokens[:, 1]
    draft_probs = torch.zeros(batch, 4, V)
    for n in (1, 2, 3):  # the proposal given the earlier siblings (a repeat removes nothing new)
        draft_probs[:, n] = proposals[:, 0].scatter(1, tokens[:, 1:n], 0.0)
    draft_probs = draft_probs / draft_probs.sum(-1, keepdim=True).clamp_min(1e-30)
    tree = DraftTree.from_parents(torch.tensor(parents)[None].expand(batch, -1).contiguous())
    rule = LanternAcceptance(nearest, k=4, delta=0.2, variant="official", official_path="static-llamagen")
    verdict = rule.verify(Draft(tokens, draft_probs, tree), Categorical(target), _gen(16))
    g = _gen(16)
    rs = torch.rand(batch, 4, generator=g)
    us = torch.rand(batch, generator=g)
    for b in range(batch):
        accepted, sample_p = _official_lantern_sampling(
            tokens[b], parents, target[b], proposals[b], rs[b], nearest, 4, 0.2, "static-llamagen"
        )
        assert verdict.tokens[b, : len(accepted)].tolist() == accepted
        assert int(verdict.tokens[b, len(accepted)]) == _inverse_cdf(sample_p, us[b])
    assert int((verdict.accepted_nodes[:, 0] == 2).sum()) == 0  # the repeat is never the accepted node


class _RootOnlyDrafter:
    """A custom drafter that proposes nothing: a root-only tree every step (issue: this reached the
    empty-draft crash inside the loop)."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def prefill(self, ctx, prompt, prefill):
        pass

    def draft(self, ctx, num_draft_tokens, generator):
        batch = ctx.last_tokens.shape[0]
        return Draft(ctx.last_tokens[:, None], None, DraftTree.chain(0, batch).to(ctx.last_tokens.device))

    def verify_width(self, num_draft_tokens):
        return 1

    def commit(self, ctx, verdict):
        pass


def test_root_only_trees_through_the_loop_are_greedy_decoding(target):
    """Every rule, fed root-only trees by a drafter, commits the bonus token alone each step: under
    greedy decoding that is the greedy baseline, token for token."""
    from mmspec.loops import required_cache_len, speculative_generate
    from mmspec.sampling import SamplingConfig
    from mmspec.types import TokenPrompt

    vocab = target.vocab_size
    codebook = torch.randn(vocab, 3, generator=_gen(21))
    table = build_latent_neighbours(codebook, vocab - 1)
    prompt = TokenPrompt.from_lists([[1, 2, 3], [4, 5]])
    greedy = SamplingConfig(temperature=0)

    def run(drafter, rule):
        cache = target.new_cache(2, required_cache_len(3, 12, 1))
        return speculative_generate(
            target,
            prompt,
            cache,
            max_new_tokens=12,
            drafter=drafter,
            num_draft_tokens=1,
            sampling=greedy,
            acceptance=rule,
            generator=_gen(0),
        )

    baseline = run(None, "exact")
    rules = [
        get_acceptance_rule("greedy"),
        get_acceptance_rule("exact"),
        LanternAcceptance(table, k=4, delta=0.3),
        GSDAcceptance(codebook),
        LanternAcceptance(table, k=4, delta=0.3, variant="official"),
        LanternAcceptance(table, k=4, delta=0.3, variant="official", greedy=True),
        GSDAcceptance(codebook, variant="official"),
    ]
    for rule in rules:
        out = run(_RootOnlyDrafter(vocab), rule)
        assert torch.equal(out.tokens, baseline.tokens), rule
        assert out.stats.steps == baseline.stats.steps, rule
