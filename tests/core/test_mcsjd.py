"""MC-SJD (arXiv 2510.24211): coupled Jacobi redrafting is lossless, and a wrong coupling is not.
Adaptive draft windows (mmspec.drafters.adaptive): lossless, recorded, bounded by the maximum."""

import pytest
import torch

from mmspec.drafters import AdaptiveWindow, JacobiDrafter, ModelDrafter
from mmspec.drafters.jacobi import maximal_coupling
from mmspec.sampling import SamplingConfig, sample_from_probs

from ..conftest import assert_rows_follow, tiny_lm
from .test_loop import DRAFTERS, PROMPTS, _exact_joint, generate


class ReusePreviousToken(JacobiDrafter):
    """A deliberately WRONG coupling: keep the previous guess whenever the new distribution allows
    it (``q_t(y) > 0``), without the ``min(1, q_t(y) / q_{t-1}(y))`` correction, while still reporting
    ``q_t`` as its draft probability. The draft then follows (mostly) the old law, not ``q_t``."""

    def couple(self, prev_tokens, prev_probs, new_probs, generator):
        allowed = new_probs.gather(-1, prev_tokens[..., None])[..., 0] > 0
        return torch.where(allowed, prev_tokens, sample_from_probs(new_probs, generator)), allowed


COUPLED = {
    "maximal": lambda v, **kw: JacobiDrafter(v, coupling="maximal", **kw),
    "gumbel": lambda v, **kw: JacobiDrafter(v, coupling="gumbel", **kw),
    "maximal-copy": lambda v, **kw: JacobiDrafter(v, coupling="maximal", init="copy", copy_offset=3, **kw),
    "gumbel-heuristic": lambda v, **kw: AdaptiveWindow(JacobiDrafter(v, coupling="gumbel", **kw), "heuristic"),
    "maximal-cost": lambda v, **kw: AdaptiveWindow(JacobiDrafter(v, coupling="maximal", **kw), "cost", explore_every=2),
}


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("kind", sorted(COUPLED))
@pytest.mark.parametrize("acceptance", ["greedy", "exact"])
def test_greedy_mcsjd_equals_greedy_baseline(target, batch, kind, acceptance):
    base = generate(target, PROMPTS[:batch])
    spec = generate(target, PROMPTS[:batch], COUPLED[kind](target.vocab_size), acceptance=acceptance)
    assert torch.equal(spec.tokens, base.tokens)


@pytest.mark.parametrize("kind", ["maximal", "gumbel", "maximal-cost"])
def test_mcsjd_sampling_reproduces_target_distribution(kind):
    """Same set-up and tolerance as the loop's distribution test (3x the expected TVD of an exact
    sampler, 20k samples): the coupled drafts are verified against the law they really follow."""
    vocab, length, n = 5, 3, 20_000
    target = tiny_lm(vocab_size=vocab, dim=16, n_layer=1, n_head=2, seed=11, sharpness=1.5)
    sampling = SamplingConfig(temperature=0.9, top_k=4)
    prompt = [0, 1, 2, 1]
    drafter = COUPLED[kind](vocab)
    out = generate(target, [prompt] * n, drafter, k=2, sampling=sampling, max_new=length, seed=7)
    assert_rows_follow(out.tokens, _exact_joint(target, prompt, vocab, length, sampling))
    inner = drafter.drafter if isinstance(drafter, AdaptiveWindow) else drafter
    assert int(inner.num_coupled) > n // 2  # the coupling really ran (on positions with a previous guess)
    assert 0 < int(inner.num_kept) < int(inner.num_coupled)


def test_broken_coupling_fails_the_distribution_test():
    """The control: reusing the previous token without correcting its draft probability is caught."""
    vocab, length, n = 5, 3, 20_000
    target = tiny_lm(vocab_size=vocab, dim=16, n_layer=1, n_head=2, seed=11, sharpness=1.5)
    sampling = SamplingConfig(temperature=0.9, top_k=4)
    prompt = [0, 1, 2, 1]
    out = generate(
        target,
        [prompt] * n,
        ReusePreviousToken(vocab, coupling="maximal"),
        k=2,
        sampling=sampling,
        max_new=length,
        seed=7,
    )
    with pytest.raises(AssertionError):
        assert_rows_follow(out.tokens, _exact_joint(target, prompt, vocab, length, sampling))


def test_maximal_coupling_keeps_one_minus_tv_and_has_the_new_marginal():
    """P(x = y) = 1 - TV(q_t, q_{t-1}) (the maximum) and x ~ q_t, for y ~ q_{t-1}; 200k draws."""
    g = torch.Generator().manual_seed(0)
    n, v = 200_000, 6
    prev = torch.softmax(torch.randn(v, generator=g) * 2, -1)
    new = torch.softmax(torch.randn(v, generator=g) * 2, -1)
    y = sample_from_probs(prev.expand(n, 1, v), g)  # [n, 1]
    x, kept = maximal_coupling(y, prev.expand(n, 1, v), new.expand(n, 1, v), g)
    tv = 0.5 * (prev - new).abs().sum()
    assert abs(float((x == y).float().mean()) - float(1 - tv)) < 0.005
    assert torch.equal(kept, x == y)  # a rejected y has no residual mass: the redraw never lands on it
    freq = torch.bincount(x.flatten(), minlength=v).float() / n
    assert float((freq - new).abs().max()) < 0.005


def test_gumbel_coupling_keeps_tokens_when_the_distribution_does_not_move():
    """With unchanged target distributions the Gumbel redraw reproduces the previous draw exactly,
    while SJD's independent redraw re-rolls it."""
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(64, 8, 32, generator=g), -1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=g)
    from mmspec.drafters.jacobi import gumbel_coupling

    assert torch.equal(gumbel_coupling(probs, noise), gumbel_coupling(probs.clone(), noise))
    assert not torch.equal(sample_from_probs(probs, g), sample_from_probs(probs, g))


def test_mcsjd_keeps_more_drafts_than_sjd_on_a_peaked_model():
    """The point of the coupling: on a model with peaked (image-like) distributions at temperature 1,
    the window settles and more drafts are kept per step than with independent redraws."""
    target = tiny_lm(vocab_size=48, seed=3, sharpness=3.0)
    sampling = SamplingConfig(temperature=1.0)
    prompts = PROMPTS * 4
    drafters = {c: JacobiDrafter(48, coupling=c) for c in ("none", "maximal", "gumbel")}
    runs = {c: generate(target, prompts, d, k=6, sampling=sampling, max_new=40, seed=2) for c, d in drafters.items()}
    stable = drafters["maximal"]
    assert int(stable.num_coupled_drawn) > 0 and 0 < int(stable.num_kept_drawn) < int(stable.num_coupled_drawn)
    assert int(drafters["none"].num_coupled) == 0  # SJD does not couple
    sjd = runs["none"].stats.mean_accepted
    assert runs["maximal"].stats.mean_accepted > 1.2 * sjd, {c: r.stats.mean_accepted for c, r in runs.items()}
    assert runs["gumbel"].stats.mean_accepted > 1.2 * sjd, {c: r.stats.mean_accepted for c, r in runs.items()}


def test_coupling_option_is_checked():
    with pytest.raises(ValueError, match="coupling must be one of"):
        JacobiDrafter(8, coupling="max")


# ---------------------------------------------------------------------------------------- adaptive


def test_adaptive_window_widths_are_recorded_and_bounded(target, draft_model):
    drafter = AdaptiveWindow(ModelDrafter(draft_model), "heuristic", initial=2)
    out = generate(target, PROMPTS[:1], drafter, k=6, max_new=40)
    widths = out.stats.draft_widths
    assert widths == drafter.widths and len(widths) == out.stats.steps
    assert widths[0] == 2 and max(widths) <= 6 and min(widths) >= 1 and len(set(widths)) > 1
    for a, b in zip(widths, widths[1:]):  # transformers' schedule: +2 after a fully accepted step, else -1
        assert b in (min(a + 2, 6), max(a - 1, 1))
    assert out.stats.summary()["mean_draft_width"] == pytest.approx(sum(widths) / len(widths))


class SyntheticCost(AdaptiveWindow):
    """An adaptive window whose steps cost ``1 + slope * width`` synthetic seconds (a noise-free clock)."""

    def __init__(self, drafter, slope, **kw):
        self.now, self.slope = 0.0, slope
        super().__init__(drafter, "cost", clock=lambda: self.now, **kw)

    def draft(self, ctx, num_draft_tokens, generator):
        if self.widths:
            self.now += 1.0 + self.slope * self.widths[-1]
        return super().draft(ctx, num_draft_tokens, generator)


def test_cost_policy_goes_wide_when_drafts_are_kept_and_narrow_when_they_are_not(target):
    # Every draft kept (self-drafting), a cheap verify: the widest window wins.
    wide = SyntheticCost(ModelDrafter(target), slope=0.05, explore_every=4)
    generate(target, PROMPTS[:1], wide, k=6, max_new=60)
    assert wide.candidates(6) == [0, 1, 2, 4, 6] and set(wide.widths) == {4, 6}  # 4: exploration probes
    assert max(wide.candidates(6), key=lambda w: wide.expected_tokens(w) / wide.cost(w)) == 6
    # Random-guess drafts on a peaked model at temperature 1 (few kept), an expensive verify: narrow.
    narrow = SyntheticCost(JacobiDrafter(target.vocab_size), slope=0.5, explore_every=4)
    generate(target, PROMPTS[:1], narrow, k=6, max_new=60, sampling=SamplingConfig(temperature=1.0), seed=3)
    assert max(narrow.widths[-12:]) <= 2
    # What was learned carries over to the next call through `memory` (per batch size).
    memory = {}
    first = SyntheticCost(ModelDrafter(target), slope=0.05, explore_every=0, memory=memory)
    generate(target, PROMPTS[:1], first, k=6, max_new=30)
    second = SyntheticCost(ModelDrafter(target), slope=0.05, explore_every=0, memory=memory)
    generate(target, PROMPTS[:1], second, k=6, max_new=30)
    assert set(memory) == {0, 1} and second.widths[0] == 6 and memory[1]["counts"][6] > 0


def test_cost_policy_lets_a_jacobi_window_settle_before_measuring_it(target, draft_model):
    """A Jacobi window's fresh guesses are not what its width earns once they have converged: the
    first ceil(w / 2) steps after a width change (or a call's start) are not measured, and a probe is
    held until three settled steps are; a draft model's window is measured from its first step."""
    sampling = SamplingConfig(temperature=1.0)
    fixed = SyntheticCost(JacobiDrafter(target.vocab_size), slope=0.1, explore_every=0, min_width=4)
    out = generate(target, PROMPTS[:1], fixed, k=4, max_new=40, sampling=sampling)
    assert set(fixed.widths) == {4} and fixed._counts[4] == out.stats.steps - 2
    model = SyntheticCost(ModelDrafter(draft_model), slope=0.1, explore_every=0, min_width=4)
    out = generate(target, PROMPTS[:1], model, k=4, max_new=40, sampling=sampling)
    assert model._counts[4] == out.stats.steps
    # The target drafting for itself, flagged stateful: once the widest window has been measured it
    # wins, and every probe of its neighbour (width 4) is held for 2 unmeasured and 3 measured steps.
    probing = SyntheticCost(StatefulSelfDraft(target), slope=0.05, explore_every=4)
    generate(target, PROMPTS[:1], probing, k=8, max_new=400)
    runs, start = [], 0  # maximal runs of one width
    for i in range(1, len(probing.widths) + 1):
        if i == len(probing.widths) or probing.widths[i] != probing.widths[start]:
            runs.append((probing.widths[start], i - start))
            start = i
    settled = runs[next(i for i, (w, n) in enumerate(runs) if w == 8 and n > 1) : -1]
    assert {w for w, _ in settled} == {4, 8} and all(n == 5 for w, n in settled if w == 4), runs
    assert sum(w == 4 for w, _ in settled) >= 3, runs


class StatefulSelfDraft(ModelDrafter):
    """A draft model flagged as a stateful window (for the settling rule alone)."""

    stateful_window = True


@pytest.mark.parametrize("kind", ["ngram", "model-chain", "sjd", "sjd-copy"])
@pytest.mark.parametrize("batch", [1, 3])
def test_cost_policy_skips_drafting_when_it_does_not_pay_and_stays_lossless(target, draft_model, kind, batch):
    """Width 0 (no draft: a plain target step) interleaved with drafting steps (exploration probes):
    the drafter's state (a draft model's cache, a Jacobi window) must survive the skipped steps."""
    drafter = SyntheticCost(DRAFTERS[kind](target, draft_model), slope=5.0, explore_every=6, min_width=0)
    base = generate(target, PROMPTS[:batch])
    spec = generate(target, PROMPTS[:batch], drafter, k=4, max_new=30)
    assert torch.equal(spec.tokens, base.tokens)
    widths = drafter.widths
    assert widths.count(0) > len(widths) // 2 and max(widths[1:]) >= 1  # mostly skipped; one-step probes draft


def test_a_draft_model_that_skipped_steps_still_samples_the_target_law():
    """Sampling with a zero-width step before drafting resumes (the draft model then catches up on
    the skipped token): the committed rows follow the target's exact joint law (20,000 rows)."""
    vocab, length, n = 5, 4, 20_000
    target = tiny_lm(vocab_size=vocab, dim=16, n_layer=1, n_head=2, seed=11, sharpness=1.5)
    draft = tiny_lm(vocab_size=vocab, dim=16, n_layer=1, n_head=2, seed=12, sharpness=1.5)
    sampling = SamplingConfig(temperature=0.9, top_k=4)
    prompt = [0, 1, 2, 1]
    drafter = AdaptiveWindow(ModelDrafter(draft), "heuristic", min_width=0, initial=0)
    out = generate(target, [prompt] * n, drafter, k=2, sampling=sampling, max_new=length, seed=7)
    assert drafter.widths[:2] == [0, 2]  # a skipped step, then a draft that first catches up
    assert_rows_follow(out.tokens, _exact_joint(target, prompt, vocab, length, sampling))


class ScriptedWidths:
    """A chain drafter drafting the widths of ``script`` in turn (then the maximum)."""

    def __init__(self, drafter, script):
        self.drafter, self.script, self.widths = drafter, script, []
        self.vocab_size = drafter.vocab_size

    def verify_width(self, k):
        return self.drafter.verify_width(k)

    def prefill(self, ctx, prompt, prefill):
        self.drafter.prefill(ctx, prompt, prefill)

    def draft(self, ctx, k, generator):
        self.widths.append(self.script[len(self.widths)] if len(self.widths) < len(self.script) else k)
        return self.drafter.draft(ctx, self.widths[-1], generator)

    def commit(self, ctx, verdict):
        self.drafter.commit(ctx, verdict)


@pytest.mark.parametrize("batch", [1, 3])
def test_a_draft_model_catches_up_on_skipped_steps(target, batch):
    """The target drafting for itself keeps every draft only if its cache holds exactly the committed
    tokens: runs of skipped steps (1, then 3) must be caught up before each draft."""
    drafter = ScriptedWidths(ModelDrafter(target), [0, 3, 0, 0, 0, 2, 0, 3])
    out = generate(target, PROMPTS[:batch], drafter, k=3, max_new=40)
    assert torch.equal(out.tokens, generate(target, PROMPTS[:batch], max_new=40).tokens)
    assert int(out.stats.proposed_at_depth.sum()) > 0
    assert torch.equal(out.stats.accepted_at_depth, out.stats.proposed_at_depth)  # every draft kept


def test_which_windows_may_skip_drafting(draft_model):
    assert AdaptiveWindow(ModelDrafter(draft_model), "heuristic").min_width == 1
    assert AdaptiveWindow(ModelDrafter(draft_model), "cost").min_width == 0
    assert AdaptiveWindow(JacobiDrafter(draft_model.vocab_size), "cost").min_width == 1  # stateful window
    with pytest.raises(ValueError, match="0 <= min_width"):
        AdaptiveWindow(ModelDrafter(draft_model), "cost", min_width=-1)


def test_adaptive_window_refuses_trees_and_bad_policies(draft_model):
    with pytest.raises(ValueError, match="chain drafter"):
        AdaptiveWindow(ModelDrafter(draft_model, num_alternatives=2))
    with pytest.raises(ValueError, match="window policy must be one of"):
        AdaptiveWindow(ModelDrafter(draft_model), "fast")
    assert AdaptiveWindow(ModelDrafter(draft_model)).verify_width(5) == 6  # the maximum sizes the cache
