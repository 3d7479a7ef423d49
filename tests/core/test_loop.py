import itertools
import math

import pytest
import torch

from mmspec.drafters import JacobiDrafter, ModelDrafter, NGramDrafter
from mmspec.loops import required_cache_len, speculative_generate
from mmspec.sampling import SamplingConfig, logits_to_probs
from mmspec.stats import SOURCE_ACCEPTED, SOURCE_BONUS, SOURCE_PREFILL, SOURCE_RECOVERED
from mmspec.types import TokenPrompt

from ..conftest import assert_rows_follow, noisy_copy, tiny_lm

PROMPTS = [[1, 2, 3, 4, 5, 1, 2, 3], [7, 8], [9, 9, 9, 9, 9], [4, 5, 6, 7, 8, 9, 10]]
GREEDY = SamplingConfig(temperature=0)


def generate(target, prompts, drafter=None, k=4, sampling=GREEDY, acceptance="exact", max_new=30, seed=0, **kw):
    prompt = TokenPrompt.from_lists(prompts)
    window = 1 if drafter is None or k < 1 else drafter.verify_width(k)
    cache = target.new_cache(len(prompts), required_cache_len(prompt.tokens.shape[1], max_new, window))
    return speculative_generate(
        target,
        prompt,
        cache,
        max_new_tokens=max_new,
        drafter=drafter,
        num_draft_tokens=k,
        sampling=sampling,
        acceptance=acceptance,
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )


DRAFTERS = {
    "ngram": lambda t, d: NGramDrafter(t.vocab_size),
    "model-chain": lambda t, d: ModelDrafter(d),
    "model-tree": lambda t, d: ModelDrafter(d, num_alternatives=3),
    "sjd": lambda t, d: JacobiDrafter(t.vocab_size),
    "sjd-copy": lambda t, d: JacobiDrafter(t.vocab_size, init="copy", copy_offset=3),
}


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("drafter", sorted(DRAFTERS))
@pytest.mark.parametrize("acceptance", ["greedy", "exact"])
def test_greedy_speculation_equals_greedy_baseline(target, draft_model, batch, drafter, acceptance):
    base = generate(target, PROMPTS[:batch])
    spec = generate(target, PROMPTS[:batch], DRAFTERS[drafter](target, draft_model), acceptance=acceptance)
    assert torch.equal(spec.tokens, base.tokens)
    assert spec.stats.steps < base.stats.steps or drafter in ("ngram", "sjd", "sjd-copy")


def test_ragged_acceptance_is_exercised(target, draft_model):
    out = generate(target, PROMPTS, ModelDrafter(draft_model), max_new=40)
    accepted = out.stats.row_accepted / out.stats.row_steps
    assert 0 < out.stats.mean_accepted < 4
    assert accepted.max() - accepted.min() > 0.2  # rows really accept different amounts


def test_seeded_runs_are_deterministic_and_seeds_matter(target, draft_model):
    sampling = SamplingConfig(temperature=1.0, top_k=20)
    a = generate(target, PROMPTS, ModelDrafter(draft_model), sampling=sampling, seed=3)
    b = generate(target, PROMPTS, ModelDrafter(draft_model), sampling=sampling, seed=3)
    c = generate(target, PROMPTS, ModelDrafter(draft_model), sampling=sampling, seed=4)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)


def _exact_joint(target, prompt, vocab, length, sampling):
    """Exact probability of every continuation of ``length`` tokens (enumerated with the target)."""
    joint = {}
    for seq in itertools.product(range(vocab), repeat=length):
        tokens = torch.tensor([prompt + list(seq)])
        logits = target(tokens, torch.arange(tokens.shape[1])[None], target.new_cache(1, tokens.shape[1])).logits
        probs = logits_to_probs(logits[0, len(prompt) - 1 : -1], sampling)
        joint[seq] = math.prod(probs[i, t].item() for i, t in enumerate(seq))
    return joint


@pytest.mark.parametrize("kind", ["chain", "tree", "ngram", "sjd"])
def test_exact_speculative_sampling_reproduces_target_distribution(kind):
    """Empirical joint law of the first 3 generated tokens vs the exact one, 20k samples in one batch.
    Tolerance: 3x the expected total-variation error of an exact sampler (shrinks as 1/sqrt(n))."""
    vocab, length, n = 5, 3, 20_000
    target = tiny_lm(vocab_size=vocab, dim=16, n_layer=1, n_head=2, seed=11, sharpness=1.5)
    drafter = {
        "chain": ModelDrafter(noisy_copy(target, 1.0, seed=5)),
        "tree": ModelDrafter(noisy_copy(target, 1.0, seed=5), num_alternatives=2),
        "ngram": NGramDrafter(
            vocab, max_ngram=1, min_ngram=1, batch_width="max"
        ),  # "min" over 20k rows: mostly empty drafts
        "sjd": JacobiDrafter(vocab),
    }[kind]
    sampling = SamplingConfig(temperature=0.9, top_k=4)
    prompt = [0, 1, 2, 1]
    out = generate(target, [prompt] * n, drafter, k=2, sampling=sampling, max_new=length, seed=7)
    exact = _exact_joint(target, prompt, vocab, length, sampling)
    assert_rows_follow(out.tokens, exact)
    assert out.stats.mean_accepted > 0.2  # speculation actually happened (accepted drafts kept in the output)


def test_invalid_settings_raise(target, draft_model):
    with pytest.raises(ValueError, match="num_draft_tokens must be >= 1"):
        generate(target, PROMPTS[:1], ModelDrafter(draft_model), k=0)
    with pytest.raises(ValueError, match="draft vocabulary size 40 does not match target vocabulary size 48"):
        generate(target, PROMPTS[:1], ModelDrafter(tiny_lm(vocab_size=40)))
    with pytest.raises(ValueError, match="needs greedy decoding"):
        generate(target, PROMPTS[:1], ModelDrafter(draft_model), acceptance="greedy", sampling=SamplingConfig())
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        generate(target, PROMPTS[:1], sampling=SamplingConfig(top_k=1000))
    with pytest.raises(ValueError, match="unknown acceptance rule 'nope'"):
        generate(target, PROMPTS[:1], ModelDrafter(draft_model), acceptance="nope")
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(target, PROMPTS[:1], max_new=0)


def test_verify_width_sizes_the_cache_and_a_small_cache_is_a_clear_error(target, draft_model):
    assert (
        NGramDrafter(48).verify_width(4)
        == JacobiDrafter(48).verify_width(4)
        == ModelDrafter(draft_model).verify_width(4)
        == 5
    )
    assert ModelDrafter(draft_model, num_alternatives=3).verify_width(4) == 13  # root + 4 x (chain node + 2 siblings)
    prompt = TokenPrompt.from_lists(PROMPTS[:1])
    exact = required_cache_len(prompt.tokens.shape[1], 30, 13)
    tree = ModelDrafter(draft_model, num_alternatives=3)
    out = speculative_generate(
        target, prompt, target.new_cache(1, exact), max_new_tokens=30, drafter=tree, num_draft_tokens=4, sampling=GREEDY
    )
    assert torch.equal(out.tokens, generate(target, PROMPTS[:1]).tokens)  # the exact size suffices
    with pytest.raises(ValueError, match=r"holds 63 positions but this run needs 64 .*verify windows of 13"):
        speculative_generate(
            target,
            prompt,
            target.new_cache(1, exact - 1),
            max_new_tokens=30,
            drafter=tree,
            num_draft_tokens=4,
            sampling=GREEDY,
        )


def test_eos_stops_rows_independently(target, draft_model):
    base = generate(target, PROMPTS, max_new=30)
    eos = base.tokens[0, 5].item()  # a token row 0 emits early
    spec = generate(target, PROMPTS, ModelDrafter(draft_model), max_new=30, eos_token_id=eos, pad_token_id=-7)
    for row, (b, s, n) in enumerate(zip(base.tokens.tolist(), spec.tokens.tolist(), spec.lengths.tolist())):
        stop = b.index(eos) + 1 if eos in b else 30
        assert n == stop and s[:n] == b[:n] and all(t == -7 for t in s[n:]), row


def test_stats_account_for_every_token(target, draft_model):
    out = generate(target, PROMPTS, ModelDrafter(draft_model), max_new=25)
    src = out.stats.token_source
    assert (src[:, 0] == SOURCE_PREFILL).all() and (src >= 0).all()
    per_row_steps = ((src == SOURCE_RECOVERED) | (src == SOURCE_BONUS)).sum(1)
    # Every step commits exactly one recovered-or-bonus token (the last step may be cut at max_new).
    assert (per_row_steps <= out.stats.row_steps).all() and (per_row_steps >= out.stats.row_steps - 1).all()
    assert (src == SOURCE_ACCEPTED).sum() <= out.stats.row_accepted.sum()
    s = out.stats.summary()
    assert s["mean_tokens_per_step_with_bonus"] == pytest.approx(s["mean_accepted_without_bonus"] + 1)
    assert len(s["acceptance_rate_at_depth"]) == 4 and all(0 <= r <= 1 for r in s["acceptance_rate_at_depth"])
    base = generate(target, PROMPTS, max_new=25)
    assert base.stats.steps == 24 and base.stats.mean_accepted == 0


def test_lossy_rules_moved_mass_is_accounted(target, draft_model):
    """A rule that reports moved mass: stats sum it over committed tokens only."""
    from mmspec.acceptance import ExactAcceptance

    class Reporting(ExactAcceptance):
        name = "reporting-test"
        lossless = False

        def verify(self, draft, target, generator):
            verdict = super().verify(draft, target, generator)
            verdict.moved_mass = torch.full(verdict.tokens.shape, 0.01)
            return verdict

    out = generate(target, PROMPTS, ModelDrafter(draft_model), acceptance=Reporting(), max_new=20)
    s = out.stats.summary()
    # Every token a verify step committed is counted (also the few a final step commits past max_new).
    in_output = int((out.stats.token_source > SOURCE_PREFILL).sum())
    assert in_output <= out.stats.moved_mass_tokens <= in_output + len(PROMPTS) * 5
    assert s["mean_tvd_per_token"] == pytest.approx(0.01) and s["max_tvd_per_token"] == pytest.approx(0.01)
    assert generate(target, PROMPTS, max_new=5).stats.summary()["mean_tvd_per_token"] is None


def test_decoding_records_no_autograd_graph_even_in_grad_mode(target, draft_model):
    """Training code calls the loop to make distillation data with trainable (requires_grad) models;
    the loop must not record the decode steps (that graph holds every step's activations)."""
    assert all(p.requires_grad for p in target.parameters())
    prompt = TokenPrompt.from_lists(PROMPTS[:2])
    cache = target.new_cache(2, required_cache_len(prompt.tokens.shape[1], 12, 5))
    with torch.enable_grad():
        out = speculative_generate(
            target,
            prompt,
            cache,
            max_new_tokens=12,
            drafter=ModelDrafter(draft_model),
            num_draft_tokens=4,
            sampling=GREEDY,
        )
    assert out.tokens.grad_fn is None and not cache.k.requires_grad and not cache.v.requires_grad


@pytest.mark.parametrize("drafter", ["sjd", "model-chain"])
def test_what_leaves_the_loop_is_not_an_inference_tensor(target, draft_model, drafter):
    """The loop runs in inference mode; its outputs, stats and whatever a callback keeps must still
    be writable in place and usable by autograd afterwards (pipelines trim stats again, training
    recipes embed generated replies)."""
    kept = []
    out = generate(
        target,
        PROMPTS[:2],
        DRAFTERS[drafter](target, draft_model),
        sampling=SamplingConfig(temperature=1.0),
        max_new=12,
        callback=lambda step, num_generated, ctx: kept.append((num_generated.clone(), ctx.history[:, :4] + 0)),
    )
    tensors = [out.tokens, out.lengths, *(v for v in vars(out.stats).values() if isinstance(v, torch.Tensor))]
    tensors += [t for pair in kept for t in pair]
    assert kept and not any(t.is_inference() for t in tensors)
    out.stats.trim(out.lengths - 1)  # in place on the stats, outside the loop
    out.tokens[:, 0] = 0
    kept[0][0].add_(1)
    embedding = torch.nn.Embedding(target.vocab_size, 3)
    with torch.enable_grad():  # the suite runs without grad (conftest)
        embedding(out.tokens.clamp(min=0)).sum().backward()  # saves the ids for backward
    assert embedding.weight.grad is not None
