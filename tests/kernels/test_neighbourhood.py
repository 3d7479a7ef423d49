"""Tests of mmspec.kernels.neighbourhood: the PyTorch references against brute force, Triton
(interpreter on CPU, compiled on GPU) against the references, dispatch and validation.

Run as a script (``python test_neighbourhood.py``) with ``TRITON_INTERPRET=1`` it does the
interpreter comparisons; a test below starts it in a subprocess so that the variable is set before
triton is imported and does not leak into the other tests.
"""

import os
import subprocess
import sys
import types

import pytest
import torch

from mmspec.kernels import neighbourhood, rejection
from mmspec.kernels.neighbourhood import (
    HAS_TRITON,
    gsd_group_mass,
    gsd_group_mass_ref,
    gsd_group_mass_triton,
    lantern_neighbour_mass,
    lantern_neighbour_mass_ref,
    lantern_neighbour_mass_triton,
)
from mmspec.relaxed import gsd_candidates


def _normalise(x):
    return x / x.sum(-1, keepdim=True)


def _lantern_inputs(seed, rows=9, vocab=23, width=17, device="cpu"):
    """Peaked random targets (some exact zeros), random draft tokens and a random neighbour table
    (distinct ids, no self) wider than the K the op is asked to use."""
    g = torch.Generator().manual_seed(seed)
    probs = _normalise(torch.rand(rows, vocab, generator=g) ** 4)
    probs[0, :5] = 0.0
    probs[1] = _normalise(probs[1] + 5 * torch.nn.functional.one_hot(torch.tensor(3), vocab))
    tokens = torch.randint(vocab, (rows,), generator=g)
    table = torch.stack(
        [
            torch.cat([torch.arange(v), torch.arange(v + 1, vocab)])[torch.randperm(vocab - 1, generator=g)][:width]
            for v in range(vocab)
        ]
    )
    return probs.to(device), tokens.to(device), table.to(device)


def _gsd_inputs(seed, rows=10, vocab=29, group=7, dim=5, with_draft=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    target = _normalise(torch.rand(rows, vocab, generator=g) ** 3)
    target[0, 10:] = 0.0  # many ties at zero
    target[0] = _normalise(target[0])
    draft = _normalise(torch.rand(rows, vocab, generator=g) ** 3 + target)
    tokens = torch.multinomial(draft, 1, generator=g)[:, 0]
    tokens[1] = target[1].argmax()  # top of the ranking: the window runs off the vocabulary
    tokens[2] = target[2].argmin()
    candidates = gsd_candidates(target, tokens, group)
    embeddings = torch.randn(vocab, dim, generator=g) * 0.6
    args = (target, draft if with_draft else None, tokens, candidates, embeddings)
    return tuple(a if a is None else a.to(device) for a in args)


# --------------------------------------------------------------------------------------------
# References against brute force
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "relative,budget", [(False, 0.0), (False, 0.05), (False, 0.3), (False, 1.0), (True, 0.0), (True, 1.0), (True, 2.5)]
)
def test_lantern_reference_is_the_largest_prefix_within_budget(relative, budget):
    for seed in range(5):
        probs, tokens, table = _lantern_inputs(seed)
        k = 11
        mass, count = lantern_neighbour_mass_ref(probs, tokens, table[:, :k], budget, relative)
        assert mass.dtype == torch.float32 and count.dtype == torch.int64
        for r in range(probs.shape[0]):
            x = int(tokens[r])
            limit = budget * float(probs[r, x]) if relative else budget
            prefix, expected_mass, expected_count = 0.0, 0.0, 0
            for j in range(k):
                prefix += float(probs[r, table[x, j]])
                if prefix > limit + 1e-12:
                    break
                expected_mass, expected_count = prefix, j + 1
            assert int(count[r]) == expected_count, (r, x)
            assert float(mass[r]) == pytest.approx(expected_mass, abs=1e-6)
            assert float(mass[r]) <= limit + 1e-7


def test_lantern_reference_edge_rows():
    probs, tokens, table = _lantern_inputs(0)
    mass, count = lantern_neighbour_mass_ref(probs, tokens, table, 0.0)
    # delta = 0 moves nothing, though zero-mass neighbours at the front are counted
    assert bool((mass == 0).all())
    zero_front = probs.gather(1, table[tokens].long()).cumsum(-1) == 0
    assert torch.equal(count, zero_front.sum(-1))
    mass, count = lantern_neighbour_mass_ref(probs, tokens, table[:, :0], 0.5)
    assert mass.tolist() == [0.0] * 9 and count.tolist() == [0] * 9


def test_gsd_reference_matches_brute_force():
    for seed in range(4):
        for with_draft in (True, False):
            target, draft, tokens, candidates, emb = _gsd_inputs(seed, with_draft=with_draft)
            p_sum, q_sum, members = gsd_group_mass_ref(target, draft, tokens, candidates, emb, 0.1, 1.0)
            for r in range(target.shape[0]):
                x = int(tokens[r])
                exp_p = exp_q = 0.0
                for j, c in enumerate(candidates[r].tolist()):
                    inside = (
                        c >= 0
                        and abs(float(target[r, c]) - float(target[r, x])) <= 0.1
                        and float(((emb[c] - emb[x]) ** 2).sum()) <= 1.0
                    )
                    assert bool(members[r, j]) == inside, (r, j)
                    if inside:
                        exp_p += float(target[r, c])
                        exp_q += float(draft[r, c]) if draft is not None else float(c == x)
                assert bool(members[r, candidates[r] == x].all())  # x is in its own group
                assert float(p_sum[r]) == pytest.approx(exp_p, abs=1e-6)
                assert float(q_sum[r]) == pytest.approx(exp_q, abs=1e-6)
            assert bool(members.any(1).all()) and not bool(members.all())


def test_dispatchers_use_reference_on_cpu():
    probs, tokens, table = _lantern_inputs(1)
    for a, b in zip(
        lantern_neighbour_mass(probs, tokens, table, 0.2), lantern_neighbour_mass_ref(probs, tokens, table, 0.2)
    ):
        assert torch.equal(a, b)
    args = _gsd_inputs(1)
    for a, b in zip(gsd_group_mass(*args, 0.15, 0.5), gsd_group_mass_ref(*args, 0.15, 0.5)):
        assert torch.equal(a, b)


def test_validation():
    probs, tokens, table = _lantern_inputs(0)
    with pytest.raises(ValueError, match=r"neighbours must have shape \[V, K\] with V = 23"):
        lantern_neighbour_mass(probs, tokens, table[:20], 0.1)
    with pytest.raises(ValueError, match=r"tokens must have shape \[R\]"):
        lantern_neighbour_mass(probs, tokens[:3], table, 0.1)
    with pytest.raises(ValueError, match="budget must be >= 0"):
        lantern_neighbour_mass(probs, tokens, table, -0.1)
    with pytest.raises(ValueError, match="int32 or int64"):
        lantern_neighbour_mass(probs, tokens, table.float(), 0.1)
    target, draft, tokens, candidates, emb = _gsd_inputs(0)
    with pytest.raises(ValueError, match=r"embeddings must have shape \[V, C\] with V = 29"):
        gsd_group_mass(target, draft, tokens, candidates, emb[:5], 0.1, 0.5)
    with pytest.raises(ValueError, match=r"draft_probs must have shape \[R, V\]"):
        gsd_group_mass(target, draft[:, :5], tokens, candidates, emb, 0.1, 0.5)
    with pytest.raises(ValueError, match="thresholds must be >= 0"):
        gsd_group_mass(target, draft, tokens, candidates, emb, -0.1, 0.5)


def test_launchers_need_triton_and_dispatch_follows_the_switch(monkeypatch):
    # Importing mmspec.kernels without triton is covered by test_rejection (same package import).
    monkeypatch.setattr(rejection, "HAS_TRITON", False)
    probs, tokens, table = _lantern_inputs(0)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        lantern_neighbour_mass_triton(probs, tokens, table, 0.1)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        gsd_group_mass_triton(*_gsd_inputs(0), 0.1, 0.5)
    fake_cuda = types.SimpleNamespace(is_cuda=True)
    monkeypatch.setattr(rejection, "HAS_TRITON", True)
    monkeypatch.setenv("MMSPEC_DISABLE_TRITON", "1")
    assert not neighbourhood._use_triton(fake_cuda)


# --------------------------------------------------------------------------------------------
# Triton interpreter vs reference (subprocess)
# --------------------------------------------------------------------------------------------


def _assert_same(ref, tri, what):
    for i, (a, b) in enumerate(zip(ref, tri)):
        assert a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()), f"{what} output {i}: ref\n{a}\ntriton\n{b}"


def _interpreter_main():
    """Runs in the TRITON_INTERPRET=1 subprocess: Triton launchers == references, bit for bit.
    The interpreter is slow (~0.2 s a launch), so each case covers a different path."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    counts = set()
    lantern_cases = [  # (seed, relative, budget, which table, block size, dtype)
        (0, False, 0.15, "slice", None, torch.float32),  # column slice: row stride 17, K = 13
        (1, False, 0.15, "int32", 4, torch.float32),  # 4 < K = 17: five chunks, the last partial
        (2, True, 3.0, "slice", None, torch.float32),  # LANTERN++ budget (lambda - 1) p(x)
        (0, False, 0.0, "int32", 8, torch.float32),
        (1, False, 1.0, "first", None, torch.float32),  # K = 1
        (2, False, 0.2, "int32", None, torch.bfloat16),
    ]
    for seed, relative, budget, which, block, dtype in lantern_cases:
        probs, tokens, table = _lantern_inputs(seed)
        neighbours = {"slice": table[:, :13], "int32": table.int(), "first": table[:, :1]}[which]
        probs = probs.to(dtype)
        ref = lantern_neighbour_mass_ref(probs, tokens, neighbours, budget, relative)
        tri = lantern_neighbour_mass_triton(probs, tokens, neighbours, budget, relative, block_size=block)
        _assert_same(ref, tri, f"lantern case {(seed, relative, budget, which, block, dtype)}")
        counts.update(ref[1].tolist())
    assert {0, 1, 13} <= counts and len(counts) >= 6, counts
    sizes = set()
    gsd_cases = [  # (seed, with draft_probs, group size, thresholds, block size)
        (0, True, 7, (0.15, 0.5), None),
        (1, False, 7, (0.05, 2.0), 2),  # 2 < C = 5: three chunks
        (2, True, 1, (0.15, 0.5), None),
        (0, False, 7, (1.0, 100.0), None),
    ]
    for seed, with_draft, group, thresholds, block in gsd_cases:
        args = _gsd_inputs(seed, group=group, with_draft=with_draft)
        ref = gsd_group_mass_ref(*args, *thresholds)
        tri = gsd_group_mass_triton(*args, *thresholds, block_size=block)
        _assert_same(ref, tri, f"gsd case {(seed, with_draft, group, thresholds, block)}")
        sizes.update(ref[2].sum(1).tolist())
    assert {1, 7} <= sizes and len(sizes) >= 4, sizes


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_interpreter_matches_reference(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    result = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------
# GPU: compiled Triton vs reference on fresh random inputs
# --------------------------------------------------------------------------------------------

requires_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and triton")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("relative,budget", [(False, 0.1), (False, 0.5), (True, 2.0)])
def test_gpu_lantern_matches_reference(dtype, relative, budget):
    from mmspec.relaxed import build_latent_neighbours

    vocab, k, rows = 16384, 1000, 256
    g = torch.Generator(device="cuda").manual_seed(0)
    table = build_latent_neighbours(torch.randn(vocab, 8, device="cuda", generator=g), k)
    for seed in range(3):
        g.manual_seed(seed)
        probs = (torch.randn(rows, vocab, device="cuda", generator=g) * 3).softmax(-1).to(dtype)
        tokens = torch.randint(vocab, (rows,), device="cuda", generator=g)
        ref = lantern_neighbour_mass_ref(probs, tokens, table, budget, relative)
        _assert_same(ref, lantern_neighbour_mass(probs, tokens, table, budget, relative), "dispatcher")
        _assert_same(
            ref, lantern_neighbour_mass_triton(probs, tokens, table, budget, relative, block_size=256), "block 256"
        )
        sliced = table[:, :700]  # a column slice is read in place (row stride 1000)
        _assert_same(
            lantern_neighbour_mass_ref(probs, tokens, sliced, budget, relative),
            lantern_neighbour_mass_triton(probs, tokens, sliced, budget, relative),
            "column slice",
        )
    assert len(set(ref[1].tolist())) >= 3


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dim", [8, 4096])
@pytest.mark.parametrize("with_draft", [True, False])
def test_gpu_gsd_matches_reference(dim, with_draft):
    vocab, rows, group = 16384, 256, 50
    g = torch.Generator(device="cuda").manual_seed(0)
    emb = torch.randn(vocab, dim, device="cuda", generator=g) / dim**0.5
    for seed in range(3):
        g.manual_seed(seed)
        logits = torch.randn(rows, vocab, device="cuda", generator=g) * 3
        target = logits.softmax(-1)
        draft = (logits + torch.randn(rows, vocab, device="cuda", generator=g)).softmax(-1)
        tokens = torch.multinomial(draft, 1, generator=g)[:, 0]
        args = (target, draft if with_draft else None, tokens, gsd_candidates(target, tokens, group), emb)
        ref = gsd_group_mass_ref(*args, 0.15, 1.5)
        _assert_same(ref, gsd_group_mass(*args, 0.15, 1.5), "dispatcher")
        _assert_same(ref, gsd_group_mass_triton(*args, 0.15, 1.5, block_size=16), "block 16")


if __name__ == "__main__":
    _interpreter_main()
