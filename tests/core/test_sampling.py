import math

import pytest
import torch

from mmspec.kernels.rejection import inverse_cdf_sample
from mmspec.sampling import RACE_MAX_ELEMENTS, SamplingConfig, logits_to_probs, race_noise, sample_from_probs


def _reference(logits, temperature, top_k, top_p):
    """Straightforward per-row re-statement of LlamaGen's sample() filtering."""
    out = []
    for row in logits.float() / temperature:
        row = row.clone()
        if top_k:
            kth = sorted(row.tolist(), reverse=True)[top_k - 1]
            row[row < kth] = float("-inf")
        if top_p < 1:
            order = sorted(range(len(row)), key=lambda i: -row[i].item())
            probs = torch.softmax(row, -1)
            total = 0.0
            keep = set()
            for i in order:
                keep.add(i)
                total += probs[i].item()
                if total > top_p:
                    break
            for i in range(len(row)):
                if i not in keep:
                    row[i] = float("-inf")
        out.append(torch.softmax(row, -1))
    return torch.stack(out)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, 1.0), (0.7, 5, 1.0), (1.3, None, 0.8), (1.0, 7, 0.6)])
def test_logits_to_probs_matches_reference(temperature, top_k, top_p):
    logits = torch.randn(6, 20, generator=torch.Generator().manual_seed(0)) * 3
    got = logits_to_probs(logits, SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p))
    want = _reference(logits, temperature, top_k, top_p)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_top_k_ties_survive_and_greedy_is_one_hot():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    probs = logits_to_probs(logits, SamplingConfig(top_k=1))
    assert probs[0, 1] == probs[0, 2] == 0.5 and probs[0, 0] == 0
    greedy = logits_to_probs(logits, SamplingConfig(temperature=0))
    assert greedy.tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_cfg_combination_before_temperature():
    cond, uncond = torch.randn(3, 10), torch.randn(3, 10)
    cfg = SamplingConfig(temperature=0.5, guidance_scale=4.0)
    want = torch.softmax((uncond + (cond - uncond) * 4.0) / 0.5, -1)
    torch.testing.assert_close(logits_to_probs(cond, cfg, uncond), want)
    # guidance_scale <= 1 ignores the unconditional branch (LlamaGen does not double the batch).
    torch.testing.assert_close(logits_to_probs(cond, SamplingConfig(), uncond), torch.softmax(cond, -1))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"top_k": 0}, "top_k must be a positive integer"),
        ({"top_k": -3}, "top_k must be a positive integer"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"guidance_scale": -2.0}, "guidance_scale must be >= 0"),
    ],
)
def test_invalid_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_top_k_larger_than_vocab_is_an_error():
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        SamplingConfig(top_k=100).validate_vocab(50)


def test_small_draws_are_torch_multinomial_on_cpu():
    probs = torch.softmax(torch.randn(8, 30, generator=torch.Generator().manual_seed(1)), -1)
    assert probs.numel() <= RACE_MAX_ELEMENTS  # the exponential race
    ours = sample_from_probs(probs, torch.Generator().manual_seed(5))
    theirs = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(5))[:, 0]
    assert torch.equal(ours, theirs)


def test_large_draws_are_inverse_cdf_with_one_uniform_per_row():
    probs = torch.softmax(torch.randn(4, 3, 1000, generator=torch.Generator().manual_seed(1)), -1)
    assert probs.numel() > RACE_MAX_ELEMENTS
    ours = sample_from_probs(probs, torch.Generator().manual_seed(5))
    uniform = torch.rand(4, 3, generator=torch.Generator().manual_seed(5))
    assert ours.shape == (4, 3)
    assert torch.equal(ours, inverse_cdf_sample(probs, uniform))


@pytest.mark.parametrize("batch", [1, 3, 4, 8])  # 8 x 512 samples by inverse CDF: no noise drawn
def test_race_noise_drawn_at_once_replays_the_draws_one_by_one(batch):
    vocab, num_draws = 512, 5
    probs = torch.softmax(torch.randn(num_draws, batch, 1, vocab, generator=torch.Generator().manual_seed(2)) * 3, -1)
    g = torch.Generator().manual_seed(7)
    one_by_one = [sample_from_probs(p, g) for p in probs]
    after_one_by_one = torch.rand(3, generator=g)
    g = torch.Generator().manual_seed(7)
    noise = race_noise(num_draws, (batch, 1, vocab), g)
    assert len(noise) == num_draws
    assert all(n is None for n in noise) == (batch * vocab > RACE_MAX_ELEMENTS)
    at_once = [sample_from_probs(p, g, n) for p, n in zip(probs, noise)]
    for ours, theirs in zip(at_once, one_by_one):
        assert torch.equal(ours, theirs)
    assert torch.equal(torch.rand(3, generator=g), after_one_by_one)  # the generator moved on alike


@pytest.mark.parametrize("rows", [1, 4000])  # the exponential race, then inverse CDF
def test_sample_from_probs_follows_the_distribution(rows):
    vocab = 6
    probs = torch.tensor([0.05, 0.0, 0.4, 0.15, 0.0, 0.4])
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_from_probs(probs.expand(rows, vocab), g) for _ in range(120_000 // rows)])
    n = draws.numel()
    empirical = torch.bincount(draws, minlength=vocab).double() / n
    bound = 5 * math.sqrt(0.25 / n)
    assert float((empirical - probs.double()).abs().max()) <= bound
    assert float(empirical[1]) == float(empirical[4]) == 0.0  # never a zero-mass token


def test_sample_from_probs_replays_noise_and_never_picks_zero_mass():
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0]]).expand(500, -1)
    draws = sample_from_probs(probs, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 2}
    noise = torch.ones(1, 4)
    noise[0, 2] = 0.1
    assert sample_from_probs(probs[:1], exp_noise=noise).item() == 2
