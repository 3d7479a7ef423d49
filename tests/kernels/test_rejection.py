"""Tests of mmspec.kernels.rejection: Triton (interpreter on CPU, compiled on GPU) against the
PyTorch reference, and the reference against the target distribution (losslessness).

Run as a script (``python test_rejection.py chain|tree``) with ``TRITON_INTERPRET=1`` it does
the interpreter comparisons; the tests below start it in a subprocess so that the variable is
set before triton is imported and does not leak into the other tests.
"""

import math
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from mmspec.kernels import rejection
from mmspec.kernels.rejection import (
    HAS_TRITON,
    chain_rejection_sample,
    chain_rejection_sample_ref,
    chain_rejection_sample_triton,
    inverse_cdf_sample,
    tree_rejection_sample,
    tree_rejection_sample_ref,
    tree_rejection_sample_triton,
)

# Tree used by the comparisons: root -> {1, 2}; 1 -> {3, 4}; 2 -> {5}; 3 -> {6}; max depth 3.
TREE_CHILDREN = [[1, 2], [3, 4], [5, -1], [6, -1], [-1, -1], [-1, -1], [-1, -1]]
TREE_DEPTH = 3


def _normalise(x):
    return x / x.sum(-1, keepdim=True)


def _peaked(generator, *shape):
    # cubed uniforms: uneven distributions with some tiny entries, like real softmax rows
    return _normalise(torch.rand(*shape, generator=generator) ** 3)


def _chain_inputs(seed, with_draft_probs, batch=5, k=4, vocab=37, device="cpu"):
    """Random chain inputs covering every path: row 0 has draft tokens with zero draft mass
    where the target has mass (always accepted), row 1 takes the all-zero residual fallback
    (draft == target, draft token outside the support), rows 2-3 accept everything (bonus)."""
    g = torch.Generator().manual_seed(seed)
    target = _peaked(g, batch, k + 1, vocab)
    draft = _normalise(_peaked(g, batch, k, vocab) + target[:, :k])  # close: long chains
    draft[0, :, :3] = 0.0
    draft = _normalise(draft)
    tokens = torch.multinomial(draft.reshape(-1, vocab), 1, generator=g).view(batch, k)
    tokens[0, 0] = 1
    target[1, 0, 5] = 0.0
    target[1] = _normalise(target[1])
    draft[1, 0] = target[1, 0]
    tokens[1, 0] = 5
    draft[2] = target[2, :k]
    target[3, :k] = _normalise(target[3, :k] + 30 * F.one_hot(tokens[3], vocab))
    args = (
        tokens,
        draft if with_draft_probs else None,
        target,
        torch.rand(batch, k, generator=g),
        torch.rand(batch, generator=g),
    )
    return tuple(a if a is None else a.to(device) for a in args)


def _tree_inputs(seed, with_draft_probs, batch=4, vocab=37, device="cpu"):
    """Random inputs on TREE_CHILDREN; row 3's targets put most mass on the drafted tokens so
    that deep paths get accepted."""
    g = torch.Generator().manual_seed(seed)
    num_nodes = len(TREE_CHILDREN)
    children = torch.tensor(TREE_CHILDREN).expand(batch, -1, -1).contiguous()
    target = _peaked(g, batch, num_nodes, vocab)
    draft = _normalise(_peaked(g, batch, num_nodes, vocab) + target)
    draft[0, :, :4] = 0.0  # zero draft mass where the target has mass
    draft = _normalise(draft)
    node_tokens = torch.multinomial(draft.reshape(-1, vocab), 1, generator=g).view(batch, -1)
    parents = {c: n for n, kids in enumerate(TREE_CHILDREN) for c in kids if c >= 0}
    for child, parent in parents.items():
        target[3, parent, node_tokens[3, child]] += 10.0
    target = _normalise(target)
    args = (
        node_tokens,
        children,
        draft if with_draft_probs else None,
        target,
        torch.rand(batch, num_nodes, generator=g),
        torch.rand(batch, generator=g),
    )
    return tuple(a if a is None else a.to(device) for a in args)


def _assert_equal(ref, tri):
    for name, a, b in zip(("num_accepted", "nodes/tokens", "out_tokens"), ref, tri):
        assert a.dtype == b.dtype == torch.int64, name
        assert torch.equal(a.cpu(), b.cpu()), f"{name}: ref\n{a}\ntriton\n{b}"


# --------------------------------------------------------------------------------------------
# Triton interpreter vs reference (subprocess)
# --------------------------------------------------------------------------------------------


def _interpreter_main(op):
    """Runs in the TRITON_INTERPRET=1 subprocess: Triton launcher == reference, exactly."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    seen = set()
    for seed in range(3):
        for with_draft_probs in (True, False):
            for block in (None, 16):  # 16 < V = 37: three chunks, the last one partial
                if op == "chain":
                    args = _chain_inputs(seed, with_draft_probs)
                    ref = chain_rejection_sample_ref(*args)
                    tri = chain_rejection_sample_triton(*args, block_size=block)
                else:
                    args = _tree_inputs(seed, with_draft_probs)
                    ref = tree_rejection_sample_ref(*args, TREE_DEPTH)
                    tri = tree_rejection_sample_triton(*args, TREE_DEPTH, block_size=block)
                _assert_equal(ref, tri)
                seen.update(ref[0].tolist())
    if op == "chain":
        assert {0, 4} <= seen and len(seen) >= 3, seen  # rejection, partial, full acceptance
        g = torch.Generator().manual_seed(7)  # k = 0: only the bonus token
        args = (
            torch.zeros(3, 0, dtype=torch.long),
            torch.zeros(3, 0, 37),
            _peaked(g, 3, 1, 37),
            torch.zeros(3, 0),
            torch.rand(3, generator=g),
        )
        _assert_equal(chain_rejection_sample_ref(*args), chain_rejection_sample_triton(*args))
        half = [
            a.to(torch.bfloat16) if a is not None and a.is_floating_point() and a.dim() == 3 else a
            for a in _chain_inputs(8, True)
        ]
        _assert_equal(chain_rejection_sample_ref(*half), chain_rejection_sample_triton(*half))
    else:
        assert {0, 1, TREE_DEPTH} <= seen, seen
        args = _tree_inputs(9, True)
        _assert_equal(
            tree_rejection_sample_ref(*args, 1),  # max_depth cuts the tree
            tree_rejection_sample_triton(*args, 1),
        )


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("op", ["chain", "tree"])
def test_triton_interpreter_matches_reference(op, tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    result = subprocess.run(
        [sys.executable, __file__, op], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------
# Reference against the target distribution
# --------------------------------------------------------------------------------------------

V_SMALL = 6
NUM_SAMPLES = 200_000


def _assert_distribution(samples, probs, what):
    """Empirical frequencies of ``samples`` match ``probs`` [V] within 5 standard errors."""
    assert samples.numel() >= 2_000, f"{what}: too few samples ({samples.numel()})"
    assert bool((samples >= 0).all()) and bool((samples < probs.numel()).all()), what
    n = samples.numel()
    empirical = torch.bincount(samples, minlength=probs.numel()).double() / n
    bound = 5 * math.sqrt(float((probs * (1 - probs)).max()) / n) + 1e-3
    error = float((empirical - probs.double()).abs().max())
    assert error <= bound, f"{what}: max error {error:.4f} > {bound:.4f}\n{empirical}\n{probs}"


def _small_dists(seed, count):
    g = torch.Generator().manual_seed(seed)
    return _normalise(torch.rand(count, V_SMALL, generator=g) + 0.05), g


def _draw(probs, generator, num=NUM_SAMPLES):
    """[num] tokens from ``probs`` [V], or one token per row of ``probs`` [num, V]."""
    if probs.dim() == 1:
        return torch.multinomial(probs, num, replacement=True, generator=generator)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _inverse_cdf_by_definition(weights, uniform):
    """The module docstring's rule spelled out: the smallest j with cumsum(w)[j] > s * sum(w)
    (float64 sums), else the last index with w > 0 (0 for an all-zero row)."""
    vocab = weights.shape[-1]
    cdf = weights.double().cumsum(-1)
    index = torch.arange(vocab)
    first = torch.where(cdf > uniform.double()[:, None] * cdf[:, -1:], index, vocab).amin(-1)
    last_positive = torch.where(weights > 0, index, 0).amax(-1)
    return torch.where(first < vocab, first, last_positive)


def test_inverse_cdf_sample_follows_the_rule():
    g = torch.Generator().manual_seed(0)
    for trial in range(100):
        vocab = int(torch.randint(1, 300, (), generator=g))
        weights = torch.rand(64, vocab, generator=g) ** 8
        weights[weights < 0.01] = 0.0  # zero-mass runs, at the ends too
        weights[0] = 0.0  # an all-zero row: index 0
        weights[1] = 0.0
        weights[1, vocab // 2] = 1e-30  # one tiny positive weight
        uniform = torch.rand(64, generator=g)
        uniform[2], uniform[3] = 1 - 2**-24, 0.0  # the largest float32 below 1, and 0
        ours = inverse_cdf_sample(weights, uniform)
        assert torch.equal(ours, _inverse_cdf_by_definition(weights, uniform)), trial
        positive = weights.sum(-1) > 0
        assert bool((weights.gather(1, ours[:, None])[:, 0] > 0)[positive].all())  # never a zero-mass token
    # any leading shape: [B, k, V] rows
    weights = torch.rand(3, 4, 50, generator=g)
    uniform = torch.rand(3, 4, generator=g)
    flat = _inverse_cdf_by_definition(weights.view(12, 50), uniform.view(12))
    assert torch.equal(inverse_cdf_sample(weights, uniform), flat.view(3, 4))


@pytest.mark.parametrize("draft_kind", ["dense", "zero_mass", "deterministic"])
def test_chain_reference_samples_the_target(draft_kind):
    k = 2
    p, g = _small_dists(0, k + 1)  # p[i]: target at position i, the same in every context
    q, _ = _small_dists(1, k)
    if draft_kind == "zero_mass":
        q[:, :2] = 0.0  # the draft never proposes tokens 0, 1: only residuals can
        q = _normalise(q)
    if draft_kind == "deterministic":
        tokens = p[:k].argmax(-1).expand(NUM_SAMPLES, k)  # always the same drafts, q one-hot
        draft_probs = None
    else:
        tokens = torch.stack([_draw(q[i], g) for i in range(k)], 1)
        draft_probs = q.expand(NUM_SAMPLES, k, V_SMALL)
    n, out = chain_rejection_sample_ref(
        tokens,
        draft_probs,
        p.expand(NUM_SAMPLES, k + 1, V_SMALL),
        torch.rand(NUM_SAMPLES, k, generator=g),
        torch.rand(NUM_SAMPLES, generator=g),
    )
    assert bool(((n > 0) & (n < k)).any()) and bool((n == k).any())
    _assert_distribution(out[:, 0], p[0], "first token")
    # position 1 is drafted and verified independently of position 0's outcome
    _assert_distribution(out[n >= 1, 1], p[1], "second token given the first was accepted")
    _assert_distribution(out[n == k, k], p[k], "bonus token")
    assert bool((out[n < k, k] == -1).all())


def test_distribution_check_can_fail():
    # Negative control: claiming q = 0 accepts every draft, so the drafts' q comes out, not p.
    p, g = _small_dists(0, 2)
    q, _ = _small_dists(1, 1)
    tokens = _draw(q[0], g)[:, None]
    _, out = chain_rejection_sample_ref(
        tokens,
        torch.zeros(NUM_SAMPLES, 1, V_SMALL),
        p.expand(NUM_SAMPLES, 2, V_SMALL),
        torch.rand(NUM_SAMPLES, 1, generator=g),
        torch.rand(NUM_SAMPLES, generator=g),
    )
    with pytest.raises(AssertionError, match="max error"):
        _assert_distribution(out[:, 0], p[0], "first token")


def _tree_batch(node_tokens, children, draft_probs, target, g, max_depth):
    num_nodes = node_tokens.shape[1]
    return tree_rejection_sample_ref(
        node_tokens,
        children.expand(NUM_SAMPLES, -1, -1),
        draft_probs,
        target.expand(NUM_SAMPLES, num_nodes, V_SMALL),
        torch.rand(NUM_SAMPLES, num_nodes, generator=g),
        torch.rand(NUM_SAMPLES, generator=g),
        max_depth,
    )


def test_tree_reference_iid_children():
    # root -> {1, 2} i.i.d. from q0 (with zero mass where p0 has mass); 1 -> {3, 4} from q1
    p, g = _small_dists(2, 5)
    q, _ = _small_dists(3, 2)
    q[0, 0] = 0.0
    q = _normalise(q)
    root = torch.zeros(NUM_SAMPLES, dtype=torch.long)
    tokens = torch.stack([root, _draw(q[0], g), _draw(q[0], g), _draw(q[1], g), _draw(q[1], g)], 1)
    draft = torch.stack([q[0], q[0], q[0], q[1], q[1]]).expand(NUM_SAMPLES, 5, V_SMALL)
    children = torch.tensor([[1, 2], [3, 4], [-1, -1], [-1, -1], [-1, -1]])
    n, nodes, out = _tree_batch(tokens, children, draft, p, g, max_depth=2)
    assert set(n.unique().tolist()) == {0, 1, 2}
    _assert_distribution(out[:, 0], p[0], "first token")
    _assert_distribution(out[nodes[:, 0] == 1, 1], p[1], "token after accepted node 1")
    _assert_distribution(out[nodes[:, 0] == 2, 1], p[2], "bonus after leaf 2")
    _assert_distribution(out[nodes[:, 1] == 3, 2], p[3], "bonus after leaf 3")
    row = torch.arange(NUM_SAMPLES)
    assert torch.equal(out[n >= 1, 0], tokens[row, nodes[:, 0].clamp_min(0)][n >= 1])


def test_tree_reference_children_without_replacement():
    p, g = _small_dists(4, 3)
    q, _ = _small_dists(5, 1)
    first = _draw(q[0], g)
    q_rest = _normalise(q[0].expand(NUM_SAMPLES, V_SMALL) * (1 - F.one_hot(first, V_SMALL)))
    second = _draw(q_rest, g)
    assert not bool((first == second).any())
    tokens = torch.stack([torch.zeros_like(first), first, second], 1)
    draft = torch.stack([q_rest, q[0].expand(NUM_SAMPLES, -1), q_rest], 1)
    n, nodes, out = _tree_batch(tokens, torch.tensor([[1, 2], [-1, -1], [-1, -1]]), draft, p, g, max_depth=1)
    _assert_distribution(out[:, 0], p[0], "first token")
    _assert_distribution(out[nodes[:, 0] == 2, 1], p[2], "bonus after the second child")


def test_tree_reference_deterministic_top2():
    p, g = _small_dists(6, 3)
    top2 = p[0].argsort(descending=True)[:2]  # deterministic drafts: q is one-hot
    tokens = torch.cat([torch.zeros(1, dtype=torch.long), top2]).expand(NUM_SAMPLES, 3)
    n, _, out = _tree_batch(tokens, torch.tensor([[1, 2], [-1, -1], [-1, -1]]), None, p, g, max_depth=1)
    assert bool((n == 0).any()) and bool((n == 1).any())
    _assert_distribution(out[:, 0], p[0], "first token")


# --------------------------------------------------------------------------------------------
# Greedy, fallback, dispatch and validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_draft_probs", [True, False])
def test_chain_greedy_accepts_iff_tokens_match(with_draft_probs):
    g = torch.Generator().manual_seed(10)
    batch, k, vocab = 64, 5, 11
    greedy = torch.randint(vocab, (batch, k + 1), generator=g)  # target argmax per position
    tokens = greedy[:, :k].clone()
    wrong = torch.rand(batch, k, generator=g) < 0.25
    tokens[wrong] = (tokens[wrong] + 1) % vocab
    draft = F.one_hot(tokens, vocab).float() if with_draft_probs else None
    n, out = chain_rejection_sample_ref(
        tokens,
        draft,
        F.one_hot(greedy, vocab).float(),
        torch.rand(batch, k, generator=g),
        torch.rand(batch, generator=g),
    )
    for b in range(batch):
        expected = next((i for i in range(k) if wrong[b, i]), k)
        assert n[b] == expected
        assert out[b].tolist() == greedy[b, : expected + 1].tolist() + [-1] * (k - expected)


def test_tree_greedy_follows_the_target_argmax():
    g = torch.Generator().manual_seed(11)
    batch, vocab = 64, 5
    num_nodes = len(TREE_CHILDREN)
    children = torch.tensor(TREE_CHILDREN).expand(batch, -1, -1)
    node_tokens = torch.randint(vocab, (batch, num_nodes), generator=g)
    greedy = torch.randint(vocab, (batch, num_nodes), generator=g)  # argmax after each node
    n, nodes, out = tree_rejection_sample_ref(
        node_tokens,
        children,
        None,
        F.one_hot(greedy, vocab).float(),
        torch.rand(batch, num_nodes, generator=g),
        torch.rand(batch, generator=g),
        TREE_DEPTH,
    )
    for b in range(batch):
        cur, path = 0, []
        while True:
            match = [c for c in TREE_CHILDREN[cur] if c >= 0 and node_tokens[b, c] == greedy[b, cur]]
            if not match:
                break
            cur = match[0]
            path.append(cur)
        assert n[b] == len(path)
        assert nodes[b].tolist() == path + [-1] * (TREE_DEPTH - len(path))
        expected = [int(node_tokens[b, c]) for c in path] + [int(greedy[b, cur])]
        assert out[b].tolist() == expected + [-1] * (TREE_DEPTH + 1 - len(expected))
    assert len(set(n.tolist())) >= 2


def test_all_zero_residual_falls_back_to_the_target():
    # draft == target and the drafted token has no mass in either: rejected, residual is 0
    p = torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.0, 1.0]])
    n, out = chain_rejection_sample_ref(
        torch.tensor([[1]]), p[None, :1], p[None], torch.tensor([[0.3]]), torch.tensor([0.9])
    )
    assert n.tolist() == [0] and out.tolist() == [[2, -1]]
    n, nodes, out = tree_rejection_sample_ref(
        torch.tensor([[0, 1]]),
        torch.tensor([[[1], [-1]]]),
        p[None, [0, 0]],
        p[None],
        torch.tensor([[0.0, 0.3]]),
        torch.tensor([0.9]),
        1,
    )
    assert n.tolist() == [0] and nodes.tolist() == [[-1]] and out.tolist() == [[2, -1]]


def test_dispatcher_uses_reference_on_cpu():
    args = _chain_inputs(0, True)
    _assert_equal(chain_rejection_sample(*args), chain_rejection_sample_ref(*args))
    args = _tree_inputs(0, False)
    _assert_equal(tree_rejection_sample(*args, TREE_DEPTH), tree_rejection_sample_ref(*args, TREE_DEPTH))


def test_disable_env_var_forces_reference(monkeypatch):
    fake_cuda = types.SimpleNamespace(is_cuda=True)
    monkeypatch.setattr(rejection, "HAS_TRITON", True)
    monkeypatch.delenv("MMSPEC_DISABLE_TRITON", raising=False)
    assert rejection._use_triton(fake_cuda)
    monkeypatch.setenv("MMSPEC_DISABLE_TRITON", "1")
    assert not rejection._use_triton(fake_cuda)


def test_module_imports_without_triton(tmp_path):
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import mmspec.kernels.rejection as K\n"
        "assert not K.HAS_TRITON\n"
        "try:\n    K.chain_rejection_sample_triton(None, None, None, None, None)\n"
        "except RuntimeError:\n    pass\nelse:\n    raise AssertionError\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr


def test_shape_validation():
    tokens, draft, target, ua, us = _chain_inputs(0, True)  # B=5, k=4, V=37
    with pytest.raises(ValueError, match=r"target_probs must have shape \[B, k\+1, V\]"):
        chain_rejection_sample(tokens, draft, target[:, :4], ua, us)
    with pytest.raises(ValueError, match="draft vocabulary size 36 does not match target vocabulary size 37"):
        chain_rejection_sample(tokens, draft[..., :36], target, ua, us)
    with pytest.raises(ValueError, match=r"draft_probs must have shape \[B, k, V\]"):
        chain_rejection_sample(tokens, draft[:, :3], target, ua, us)
    with pytest.raises(ValueError, match="uniform_accept"):
        chain_rejection_sample(tokens, draft, target, ua[:, :3], us)
    with pytest.raises(ValueError, match="uniform_sample"):
        chain_rejection_sample(tokens, draft, target, ua, us[:4])
    with pytest.raises(ValueError, match="draft_tokens"):
        chain_rejection_sample(tokens[0], draft, target, ua, us)

    node_tokens, children, draft, target, ua, us = _tree_inputs(0, True)  # B=4, N=7, V=37
    with pytest.raises(ValueError, match=r"children must have shape \[B, N, C\]"):
        tree_rejection_sample(node_tokens, children[:, :6], draft, target, ua, us, 3)
    with pytest.raises(ValueError, match=r"target_probs must have shape \[B, N, V\]"):
        tree_rejection_sample(node_tokens, children, draft, target[:3], ua, us, 3)
    with pytest.raises(ValueError, match="draft vocabulary size 30 does not match"):
        tree_rejection_sample(node_tokens, children, draft[..., :30], target, ua, us, 3)
    with pytest.raises(ValueError, match="uniform_accept"):
        tree_rejection_sample(node_tokens, children, draft, target, ua[:, :6], us, 3)
    with pytest.raises(ValueError, match="max_depth"):
        tree_rejection_sample(node_tokens, children, draft, target, ua, us, -1)


# --------------------------------------------------------------------------------------------
# GPU: compiled Triton vs reference on fresh random inputs
# --------------------------------------------------------------------------------------------

requires_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and triton")


def _gpu_chain_inputs(seed, batch, k, vocab, dtype, with_draft_probs):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(batch, k + 1, vocab, device="cuda", generator=g) * 3
    target = logits.softmax(-1)
    draft = (logits[:, :k] + torch.randn(batch, k, vocab, device="cuda", generator=g)).softmax(-1)
    tokens = torch.multinomial(draft.reshape(-1, vocab), 1, generator=g).view(batch, k)
    return (
        tokens,
        draft.to(dtype) if with_draft_probs else None,
        target.to(dtype),
        torch.rand(batch, k, device="cuda", generator=g),
        torch.rand(batch, device="cuda", generator=g),
    )


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("vocab", [37, 16384])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_draft_probs", [True, False])
def test_gpu_chain_matches_reference(vocab, dtype, with_draft_probs):
    for seed in range(3):
        args = _gpu_chain_inputs(seed, 256, 5, vocab, dtype, with_draft_probs)
        ref = chain_rejection_sample_ref(*args)
        _assert_equal(ref, chain_rejection_sample(*args))  # the dispatcher picks Triton
        _assert_equal(ref, chain_rejection_sample_triton(*args, block_size=256))
    assert len(set(ref[0].tolist())) >= 3


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("vocab", [37, 16384])
@pytest.mark.parametrize("with_draft_probs", [True, False])
def test_gpu_tree_matches_reference(vocab, with_draft_probs):
    batch, num_nodes = 256, len(TREE_CHILDREN)
    parents = [0] * num_nodes  # the root's own row is unused
    for node, kids in enumerate(TREE_CHILDREN):
        for child in kids:
            if child >= 0:
                parents[child] = node
    for seed in range(3):
        g = torch.Generator(device="cuda").manual_seed(seed)
        logits = torch.randn(batch, num_nodes, vocab, device="cuda", generator=g) * 3
        # child c is drafted from a noisy copy of its parent's target, so paths get accepted
        noisy = logits[:, parents] + torch.randn(batch, num_nodes, vocab, device="cuda", generator=g)
        draft = noisy.softmax(-1)
        node_tokens = torch.multinomial(draft.view(-1, vocab), 1, generator=g).view(batch, -1)
        args = (
            node_tokens,
            torch.tensor(TREE_CHILDREN, device="cuda").expand(batch, -1, -1),
            draft if with_draft_probs else None,
            logits.softmax(-1),
            torch.rand(batch, num_nodes, device="cuda", generator=g),
            torch.rand(batch, device="cuda", generator=g),
        )
        ref = tree_rejection_sample_ref(*args, TREE_DEPTH)
        _assert_equal(ref, tree_rejection_sample(*args, TREE_DEPTH))
        _assert_equal(ref, tree_rejection_sample_triton(*args, TREE_DEPTH, block_size=512))


if __name__ == "__main__":
    _interpreter_main(sys.argv[1])
