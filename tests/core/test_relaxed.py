"""Relaxed acceptance (mmspec.relaxed): LANTERN / LANTERN++ and GSD.

Each rule's stated bound is tested: the moved mass stays within its budget, acceptance never
drops below exact acceptance, deterministic drafts commit tokens distributed exactly as the relaxed
target, stochastic drafts stay within the gained acceptance of the target, and with relaxation
off (delta = 0, lambda = 1, G = 1) the rules reproduce ExactAcceptance token for token.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from mmspec.acceptance import ExactAcceptance, GreedyAcceptance
from mmspec.pipelines.llamagen.pipeline_llamagen import LlamaGenPipeline
from mmspec.relaxed import (
    GSDAcceptance,
    LanternAcceptance,
    build_latent_neighbours,
    gsd_candidates,
    load_or_build_neighbours,
)
from mmspec.rules import get_acceptance_rule
from mmspec.tree import DraftTree
from mmspec.types import Categorical, Draft

from ..conftest import tiny_llamagen

PARENTS = [-1, 0, 0, 0, 1, 1, 2, 4]  # root -> {1, 2, 3}; 1 -> {4, 5}; 2 -> {6}; 4 -> {7}


def _normalise(x):
    return x / x.sum(-1, keepdim=True)


def _codebook(vocab, seed=0, dim=3):
    return torch.randn(vocab, dim, generator=torch.Generator().manual_seed(seed))


def _chain(seed, batch=256, k=4, vocab=24, with_draft_probs=True):
    """Peaked targets, drafts close to them (so chains get long), tokens drawn from the drafts;
    deterministic drafts (draft_probs None) are drawn from the target itself."""
    g = torch.Generator().manual_seed(seed)
    target = _normalise(torch.rand(batch, k + 1, vocab, generator=g) ** 6)
    draft = _normalise(torch.rand(batch, k, vocab, generator=g) ** 3 + target[:, :k])
    source = draft if with_draft_probs else target[:, :k]
    tokens = torch.multinomial(source.reshape(-1, vocab), 1, generator=g).view(batch, k)
    return Draft(tokens, draft if with_draft_probs else None), target


def _tree(seed, batch=128, vocab=24, with_draft_probs=True):
    g = torch.Generator().manual_seed(seed)
    num_nodes = len(PARENTS)
    target = _normalise(torch.rand(batch, num_nodes, vocab, generator=g) ** 6)
    parent_target = target[:, [max(p, 0) for p in PARENTS]]
    draft = _normalise(torch.rand(batch, num_nodes, vocab, generator=g) ** 3 + parent_target)
    source = draft if with_draft_probs else parent_target
    tokens = torch.multinomial(source.reshape(-1, vocab), 1, generator=g).view(batch, num_nodes)
    tree = DraftTree.from_parents(torch.tensor(PARENTS)[None].expand(batch, -1).contiguous())
    return Draft(tokens, draft if with_draft_probs else None, tree), target


def _verify(rule, draft, target, seed=7):
    return rule.verify(draft, Categorical(target), torch.Generator().manual_seed(seed))


def _assert_same_verdict(a, b):
    assert torch.equal(a.num_accepted, b.num_accepted)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.is_bonus, b.is_bonus)
    assert (a.accepted_nodes is None) == (b.accepted_nodes is None)
    if a.accepted_nodes is not None:
        assert torch.equal(a.accepted_nodes, b.accepted_nodes)


def _analytic_law(rule, p, q):
    """Exact law of the committed token at one position (draft x ~ q, rule's acceptance and
    residual) and the acceptance probability gained over exact sampling."""
    vocab = p.numel()
    xs = torch.arange(vocab)
    relaxed, _ = rule.relaxed_target(p.expand(vocab, vocab), xs, q.expand(vocab, vocab))
    relaxed, p, q = relaxed.double(), p.double(), q.double()
    law = torch.zeros(vocab, dtype=torch.float64)
    gain = 0.0
    for x in range(vocab):
        accept = min(1.0, float(relaxed[x, x] / q[x]))
        gain += float(q[x]) * accept - min(float(q[x]), float(p[x]))
        law[x] += q[x] * accept
        residual = (relaxed[x] - q).clamp_min(0)
        law += q[x] * (1 - accept) * (residual / residual.sum() if residual.sum() > 0 else relaxed[x])
    return law, gain


def _assert_law(samples, law, what):
    """Empirical frequencies within 5 standard errors (+1e-3) of ``law``."""
    n = samples.numel()
    empirical = torch.bincount(samples, minlength=law.numel()).double() / n
    bound = 5 * math.sqrt(float((law * (1 - law)).max()) / n) + 1e-3
    error = float((empirical - law).abs().max())
    assert error <= bound, f"{what}: max error {error:.4f} > {bound:.4f}\n{empirical}\n{law}"
    return empirical


# --------------------------------------------------------------------------------------------
# Latent neighbour tables
# --------------------------------------------------------------------------------------------


def test_build_latent_neighbours_matches_brute_force():
    codebook = _codebook(50, dim=4)
    table = build_latent_neighbours(codebook, 7)
    assert table.shape == (50, 7) and table.dtype == torch.int32
    dist = torch.cdist(codebook.double(), codebook.double())
    dist.fill_diagonal_(float("inf"))
    assert torch.equal(table.long(), dist.argsort(1)[:, :7])
    assert torch.equal(build_latent_neighbours(codebook, 7, chunk_size=6), table)  # 9 blocks, last partial
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 49\] \(codebook size - 1\)"):
        build_latent_neighbours(codebook, 50)
    with pytest.raises(ValueError, match=r"codebook must have shape \[V, C\]"):
        build_latent_neighbours(codebook[0], 3)


def test_neighbour_cache_round_trip_and_rebuild(tmp_path, monkeypatch):
    import mmspec.relaxed as relaxed

    codebook = _codebook(30)
    table = load_or_build_neighbours(codebook, 5, tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("lantern_neighbours_k5_")

    def no_build(*args, **kwargs):
        raise AssertionError("the cached table should have been used")

    with monkeypatch.context() as m:
        m.setattr(relaxed, "build_latent_neighbours", no_build)
        assert torch.equal(load_or_build_neighbours(codebook, 5, tmp_path), table)
    # Another codebook or another k gets its own file next to the first.
    other = load_or_build_neighbours(_codebook(30, seed=1), 5, tmp_path)
    assert not torch.equal(other, table) and len(list(tmp_path.iterdir())) == 2
    assert load_or_build_neighbours(codebook, 4, tmp_path).shape == (30, 4)
    # A corrupt file is rebuilt with a warning, and the rebuilt file is good again.
    files[0].write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unusable"):
        assert torch.equal(load_or_build_neighbours(codebook, 5, tmp_path), table)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_or_build_neighbours(codebook, 5, tmp_path)
    # An explicit file built for another codebook is rebuilt.
    path = tmp_path / "table.pt"
    load_or_build_neighbours(_codebook(30, seed=2), 5, path)
    with pytest.warns(UserWarning, match="different codebook"):
        assert torch.equal(load_or_build_neighbours(codebook, 5, path), table)


# --------------------------------------------------------------------------------------------
# LANTERN
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def table24():
    return build_latent_neighbours(_codebook(24), 12)


@pytest.mark.parametrize("mode,budget", [("tvd", 0.05), ("tvd", 0.2), ("multiplicative", 2.0), ("multiplicative", 4.0)])
def test_lantern_moved_mass_within_budget(table24, mode, budget):
    kw = dict(delta=budget) if mode == "tvd" else dict(mode=mode, lam=budget)
    rule = LanternAcceptance(table24, k=12, **kw)
    g = torch.Generator().manual_seed(3)
    p = _normalise(torch.rand(4000, 24, generator=g) ** 4)
    x = torch.randint(24, (4000,), generator=g)
    relaxed, moved = rule.relaxed_target(p, x, None)
    rows = torch.arange(4000)
    p_x = p[rows, x]
    limit = budget if mode == "tvd" else (budget - 1) * p_x
    assert bool((moved <= limit + 1e-7).all()) and float(moved.max()) > 0.5 * float(torch.as_tensor(limit).max())
    torch.testing.assert_close(0.5 * (relaxed - p).abs().sum(-1), moved, atol=1e-6, rtol=0)  # TVD(p~, p) = S
    torch.testing.assert_close(relaxed[rows, x], p_x + moved)
    torch.testing.assert_close(relaxed.sum(-1), torch.ones(4000), atol=1e-6, rtol=0)
    off_x = torch.ones_like(p, dtype=torch.bool)
    off_x[rows, x] = False
    assert bool((relaxed[off_x] <= p[off_x]).all())
    if mode == "multiplicative":
        assert bool((relaxed[rows, x] <= budget * p_x * (1 + 1e-6)).all())
    # S is the largest prefix: adding the next neighbour would break the budget.
    nbr = table24[x].long()
    count = (relaxed.gather(1, nbr) == 0).long().cumprod(1).sum(1)  # counted neighbours are zeroed
    nxt = p.gather(1, nbr.gather(1, count.clamp(max=11)[:, None]))[:, 0]
    assert bool(((count == 12) | (moved + nxt > limit - 1e-7)).all())


@pytest.mark.parametrize("kind", ["chain", "tree"])
@pytest.mark.parametrize("with_draft_probs", [True, False])
@pytest.mark.parametrize("off", [dict(delta=0.0), dict(mode="multiplicative", lam=1.0)])
def test_lantern_without_relaxation_is_exact(table24, kind, with_draft_probs, off):
    draft, target = (_chain if kind == "chain" else _tree)(1, with_draft_probs=with_draft_probs)
    exact = _verify(ExactAcceptance(), draft, target)
    lantern = _verify(LanternAcceptance(table24, k=12, **off), draft, target)
    _assert_same_verdict(exact, lantern)
    assert bool((lantern.moved_mass == 0).all())
    assert len(set(exact.num_accepted.tolist())) >= 3  # the comparison covers ragged outcomes


@pytest.mark.parametrize("with_draft_probs", [True, False])
def test_lantern_accepts_at_least_exact(table24, with_draft_probs):
    for seed in range(3):
        draft, target = _chain(seed, with_draft_probs=with_draft_probs)
        exact = _verify(ExactAcceptance(), draft, target, seed)
        lantern = _verify(LanternAcceptance(table24, delta=0.15, k=12), draft, target, seed)
        assert bool((lantern.num_accepted >= exact.num_accepted).all())  # same draws, pathwise
        assert lantern.num_accepted.float().mean() > 1.2 * exact.num_accepted.float().mean()
        committed = torch.arange(5)[None] <= lantern.num_accepted[:, None]
        assert bool((lantern.moved_mass[~committed] == 0).all()) and bool((lantern.moved_mass <= 0.15 + 1e-7).all())
        assert bool((lantern.moved_mass[lantern.is_bonus, -1] == 0).all())


def test_lantern_deterministic_draft_commits_the_relaxed_target():
    """Fixed draft token (q one-hot): the committed token's law is p~_x, within delta of p."""
    vocab, n, delta = 6, 200_000, 0.2
    table = build_latent_neighbours(_codebook(vocab, seed=4), 5)
    rule = LanternAcceptance(table, delta=delta, k=5)
    g = torch.Generator().manual_seed(0)
    p = _normalise(torch.rand(2, vocab, generator=g) + 0.05)  # target at the draft and bonus positions
    x = int(p[0, table[:, 0].long()].argmin())  # the token whose nearest neighbour is lightest
    relaxed, moved = rule.relaxed_target(p[:1], torch.tensor([x]), None)
    assert 0.5 * delta < float(moved) <= delta  # mass really moves
    tokens = torch.full((n, 1), x)
    verdict = rule.verify(Draft(tokens), Categorical(p.expand(n, 2, vocab)), g)
    empirical = _assert_law(verdict.tokens[:, 0], relaxed[0].double(), "committed token vs p~_x")
    assert 0.5 * float((empirical - p[0].double()).abs().sum()) <= delta + 0.01
    _assert_law(verdict.tokens[verdict.num_accepted == 1, 1], p[1].double(), "bonus token vs p")
    torch.testing.assert_close(verdict.moved_mass[:, 0], moved.expand(n))


@pytest.mark.parametrize("rule_name", ["lantern", "gsd"])
def test_stochastic_drafts_stay_within_the_gained_acceptance(rule_name):
    """x ~ q: the committed law is the analytic one (acceptance + relaxed residual), and its
    distance to p is at most the acceptance probability gained over exact sampling."""
    vocab, n = 6, 200_000
    g = torch.Generator().manual_seed(5)
    p = _normalise(torch.rand(vocab, generator=g) ** 2 + 0.02)
    q = _normalise(torch.rand(vocab, generator=g) ** 2 + 0.02)
    codebook = _codebook(vocab, seed=6, dim=2)
    if rule_name == "lantern":
        rule = LanternAcceptance(build_latent_neighbours(codebook, 5), delta=0.15, k=5)
    else:
        rule = GSDAcceptance(codebook, group_size=4, prob_threshold=0.3, dist_threshold=4.0)
    law, gain = _analytic_law(rule, p, q)
    tvd = 0.5 * float((law - p.double()).abs().sum())
    assert 0.01 < tvd <= gain + 1e-6
    tokens = torch.multinomial(q, n, replacement=True, generator=g)[:, None]
    verdict = rule.verify(Draft(tokens, q.expand(n, 1, vocab)), Categorical(p.expand(n, 2, vocab)), g)
    _assert_law(verdict.tokens[:, 0], law, f"{rule_name} committed token vs analytic law")
    # Negative control: the law really differs from p by more than sampling noise.
    with pytest.raises(AssertionError, match="max error"):
        _assert_law(verdict.tokens[:, 0], p.double(), "committed token vs p")


def test_lantern_tree_siblings_use_the_relaxed_residual():
    """Root with two deterministic children: committed law = p~1(x1) at x1, then the second
    sibling's relaxed target on the residual p' = norm(max(0, p~1 - onehot(x1)))."""
    vocab, n, delta = 6, 200_000, 0.3
    table = build_latent_neighbours(_codebook(vocab, seed=8), 5)
    rule = LanternAcceptance(table, delta=delta, k=5)
    g = torch.Generator().manual_seed(1)
    p = _normalise(torch.rand(3, vocab, generator=g) + 0.05)
    x1 = int(p[0, table[:, 0].long()].argmin())  # the lightest nearest neighbour: mass moves
    first, moved1 = rule.relaxed_target(p[:1], torch.tensor([x1]), None)
    residual = _normalise((first - F.one_hot(torch.tensor([x1]), vocab)).clamp_min(0))
    # the second sibling: the token that moves the most mass on the residual
    _, moves = rule.relaxed_target(residual.expand(vocab, vocab), torch.arange(vocab), None)
    x2 = int(torch.where(torch.arange(vocab) == x1, -1.0, moves).argmax())
    second, moved2 = rule.relaxed_target(residual, torch.tensor([x2]), None)
    law = (
        float(first[0, x1]) * F.one_hot(torch.tensor(x1), vocab).double()
        + (1 - float(first[0, x1])) * second[0].double()
    )
    assert float(moved1) > 0 and float(moved2) > 0
    tree = DraftTree.from_parents(torch.tensor([[-1, 0, 0]]).expand(n, -1).contiguous())
    verdict = rule.verify(
        Draft(torch.tensor([[0, x1, x2]]).expand(n, -1), None, tree), Categorical(p.expand(n, 3, vocab)), g
    )
    _assert_law(verdict.tokens[:, 0], law, "first token of a relaxed tree")
    took_second = verdict.accepted_nodes[:, 0] == 2
    assert bool(took_second.any()) and bool((verdict.num_accepted == 0).any())
    torch.testing.assert_close(verdict.moved_mass[took_second, 0], (moved1 + moved2).expand(int(took_second.sum())))
    _assert_law(verdict.tokens[took_second, 1], p[2].double(), "bonus after the second child")


def test_lantern_greedy_stand_ins(table24):
    """One-hot targets: x is kept iff it is the argmax a or one of a's m nearest neighbours."""
    g = torch.Generator().manual_seed(2)
    batch, k, vocab, m = 512, 3, 24, 2
    best = torch.randint(vocab, (batch, k + 1), generator=g)
    target = F.one_hot(best, vocab).float()
    tokens = best[:, :k].clone()
    kind = torch.randint(3, (batch, k), generator=g)  # 0: the argmax, 1: a near stand-in, 2: other
    near = table24[best[:, :k], torch.randint(m, (batch, k), generator=g)].long()
    far = table24[best[:, :k], 11].long()
    tokens = torch.where(kind == 1, near, torch.where(kind == 2, far, tokens))
    draft = Draft(tokens, F.one_hot(tokens, vocab).float())
    verdict = _verify(LanternAcceptance(table24, k=12, greedy_neighbours=m), draft, target)
    expected = (kind < 2).long().cumprod(1).sum(1)
    assert torch.equal(verdict.num_accepted, expected)
    for b in range(batch):
        n = int(expected[b])
        assert verdict.tokens[b, :n].tolist() == tokens[b, :n].tolist()
        assert int(verdict.tokens[b, n]) == int(best[b, n])  # the argmax after a rejection / as bonus
        assert verdict.moved_mass[b, :n].tolist() == [float(kind[b, i] == 1) for i in range(n)]
    _assert_same_verdict(
        _verify(LanternAcceptance(table24, delta=0.3, k=12), draft, target), _verify(GreedyAcceptance(), draft, target)
    )  # m = 0: exact greedy


def test_lantern_clear_errors(table24):
    with pytest.raises(ValueError, match=r"load_or_build_neighbours\(vq.codebook_embeddings\(\), k, path\)"):
        get_acceptance_rule("lantern")
    with pytest.raises(ValueError, match=r"delta must be in \[0, 1\]"):
        LanternAcceptance(table24, delta=-0.1, k=12)
    with pytest.raises(ValueError, match="lam >= 1"):
        LanternAcceptance(table24, mode="multiplicative", lam=0.5, k=12)
    with pytest.raises(ValueError, match="lam >= 1"):
        LanternAcceptance(table24, mode="multiplicative", k=12)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 23\] \(codebook size - 1\)"):
        LanternAcceptance(table24, k=24)
    with pytest.raises(ValueError, match="holds 12 neighbours per token but k=20: rebuild"):
        LanternAcceptance(table24, k=20)
    with pytest.raises(ValueError, match="mode must be"):
        LanternAcceptance(table24, k=12, mode="l2")
    with pytest.raises(ValueError, match="greedy_neighbours"):
        LanternAcceptance(table24, k=4, greedy_neighbours=5)
    with_self = table24.clone()
    with_self[3, 0] = 3
    with pytest.raises(ValueError, match="own neighbour"):
        LanternAcceptance(with_self, k=12)
    rule = get_acceptance_rule("lantern", neighbours=table24, delta=0.1, k=12)
    assert isinstance(rule, LanternAcceptance) and not rule.lossless and "delta" in rule.bound
    draft, target = _chain(0, vocab=30)
    with pytest.raises(ValueError, match="neighbour table has 24 rows but the target vocabulary has 30"):
        _verify(rule, draft, target)


# --------------------------------------------------------------------------------------------
# GSD
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["chain", "tree"])
@pytest.mark.parametrize("with_draft_probs", [True, False])
def test_gsd_group_size_one_is_exact(kind, with_draft_probs):
    draft, target = (_chain if kind == "chain" else _tree)(2, with_draft_probs=with_draft_probs)
    rule = GSDAcceptance(_codebook(24), group_size=1, prob_threshold=1.0, dist_threshold=100.0)
    exact = _verify(ExactAcceptance(), draft, target)
    _assert_same_verdict(exact, _verify(rule, draft, target))
    assert len(set(exact.num_accepted.tolist())) >= 3


@pytest.mark.parametrize("with_draft_probs", [True, False])
def test_gsd_accepts_at_least_exact(with_draft_probs):
    rule = GSDAcceptance(_codebook(24), group_size=8, prob_threshold=0.1, dist_threshold=3.0)
    for seed in range(3):
        draft, target = _chain(seed, with_draft_probs=with_draft_probs)
        exact = _verify(ExactAcceptance(), draft, target, seed)
        gsd = _verify(rule, draft, target, seed)
        assert bool((gsd.num_accepted >= exact.num_accepted).all())  # same draws, pathwise
        assert gsd.num_accepted.float().mean() > exact.num_accepted.float().mean() + 0.1
        assert bool((gsd.moved_mass >= 0).all()) and float(gsd.moved_mass.max()) > 0


def test_gsd_group_respects_both_thresholds():
    g = torch.Generator().manual_seed(4)
    rows, vocab, size = 300, 24, 9
    p = _normalise(torch.rand(rows, vocab, generator=g) ** 3)
    q = _normalise(torch.rand(rows, vocab, generator=g) ** 3)
    x = torch.multinomial(q, 1, generator=g)[:, 0]
    emb = _codebook(vocab, seed=5)
    rule = GSDAcceptance(emb, group_size=size, prob_threshold=0.04, dist_threshold=2.0)
    candidates, p_sum, q_sum, members = rule.group(p, x, q)
    sizes = members.sum(1)
    assert int(sizes.min()) == 1 and int(sizes.max()) >= 4
    for r in range(rows):
        order = sorted(range(vocab), key=lambda t: (-float(p[r, t]), t))  # ranking, ties by id
        at = order.index(int(x[r]))
        window = [order[i] if 0 <= i < vocab else -1 for i in range(at - 4, at + 5)]
        assert candidates[r].tolist() == window
        for c, member in zip(window, members[r].tolist()):
            dp = abs(float(p[r, c] - p[r, x[r]])) if c >= 0 else math.inf
            dist = float(((emb[c] - emb[x[r]]) ** 2).sum()) if c >= 0 else math.inf
            assert member == (dp <= 0.04 and dist <= 2.0), (r, c)
        group = [c for c, member in zip(window, members[r].tolist()) if member]
        assert int(x[r]) in group
        assert float(p_sum[r]) == pytest.approx(float(p[r, group].sum()), abs=1e-6)
        assert float(q_sum[r]) == pytest.approx(float(q[r, group].sum()), abs=1e-6)


def test_gsd_relaxed_target():
    g = torch.Generator().manual_seed(6)
    rows, vocab = 2000, 24
    p = _normalise(torch.rand(rows, vocab, generator=g) ** 3)
    q = _normalise(torch.rand(rows, vocab, generator=g) ** 3)
    x = torch.multinomial(q, 1, generator=g)[:, 0]
    rule = GSDAcceptance(_codebook(vocab), group_size=10, prob_threshold=0.1, dist_threshold=3.0)
    r = torch.arange(rows)
    off_x = torch.ones(rows, vocab, dtype=torch.bool)
    off_x[r, x] = False
    for draft_probs in (q, None):
        relaxed, moved = rule.relaxed_target(p, x, draft_probs)
        _, p_sum, q_sum, _ = rule.group(p, x, draft_probs)
        q_x = q[r, x] if draft_probs is not None else torch.ones(rows)
        grouped = p_sum * q_x > p[r, x] * q_sum
        assert 0.2 < float(grouped.float().mean()) < 1
        # p~(x) = q(x) P(G) / Q(G) where the group raises acceptance, p(x) elsewhere; p~ <= p off x.
        expected = torch.where(grouped, q_x * p_sum / q_sum, p[r, x])
        torch.testing.assert_close(relaxed[r, x], expected)
        assert bool((relaxed[off_x] <= p[off_x]).all()) and bool((relaxed >= 0).all())
        torch.testing.assert_close(relaxed.sum(-1), torch.ones(rows), atol=1e-6, rtol=0)
        torch.testing.assert_close(0.5 * (relaxed - p).abs().sum(-1), moved, atol=1e-6, rtol=0)
        assert bool(torch.equal(relaxed[~grouped], p[~grouped]))  # nothing moved: p bit for bit


def test_gsd_clear_errors():
    with pytest.raises(ValueError, match=r"embeddings=vq.codebook_embeddings\(\)"):
        get_acceptance_rule("gsd")
    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
        GSDAcceptance(_codebook(24), group_size=0)
    with pytest.raises(ValueError, match="thresholds must be >= 0"):
        GSDAcceptance(_codebook(24), dist_threshold=-1.0)
    rule = get_acceptance_rule("gsd", embeddings=_codebook(24), group_size=5)
    assert isinstance(rule, GSDAcceptance) and not rule.lossless and "acceptance >= exact" in rule.bound
    draft, target = _chain(0, vocab=30)
    with pytest.raises(ValueError, match="embeddings have 24 rows but the target vocabulary has 30"):
        _verify(rule, draft, target)
    assert gsd_candidates(torch.rand(2, 5), torch.tensor([1, 4]), 1).tolist() == [[1], [4]]


# --------------------------------------------------------------------------------------------
# Through the LlamaGen pipeline (SJD drafts)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    gpt, vq = tiny_llamagen()
    pipe = LlamaGenPipeline(target=gpt, vq=vq)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, acceptance, seed):
    return pipe(
        class_labels=[0, 4, 2, 1, 3, 3],
        guidance_scale=1.0,
        speculative="sjd",
        num_draft_tokens=4,
        acceptance=acceptance,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    )


def test_pipeline_rules_without_relaxation_equal_exact(pipe):
    codebook = pipe.vq.codebook_embeddings()
    table = build_latent_neighbours(codebook, 15)
    for seed in range(2):
        exact = _run(pipe, "exact", seed)
        for rule in (LanternAcceptance(table, delta=0.0, k=15), GSDAcceptance(codebook, group_size=1)):
            assert torch.equal(_run(pipe, rule, seed).tokens, exact.tokens), (rule, seed)


def test_pipeline_relaxation_accepts_more(pipe):
    codebook = pipe.vq.codebook_embeddings()
    rules = {
        "exact": "exact",
        "lantern": LanternAcceptance(build_latent_neighbours(codebook, 8), delta=0.3, k=8),
        "lantern++": LanternAcceptance(build_latent_neighbours(codebook, 8), mode="multiplicative", lam=3.0, k=8),
        "gsd": GSDAcceptance(codebook, group_size=8, prob_threshold=0.15, dist_threshold=2.0),
    }
    accepted = {
        name: sum(_run(pipe, rule, seed).stats.mean_accepted for seed in range(3)) / 3 for name, rule in rules.items()
    }
    assert all(accepted[name] >= accepted["exact"] for name in rules), accepted
    assert accepted["lantern"] > accepted["exact"] + 0.05, accepted
