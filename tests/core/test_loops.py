"""The engine's contract beyond token prefixes: a rule and a drafter added from outside without
touching a loop; elementwise rules through the masked loop and a block router through the block
loop, on tiny synthetic "models"; each loop refusing rules that commit differently."""

from __future__ import annotations

import math

import pytest
import torch

from mmspec.acceptance import AcceptanceRule, register_acceptance_rule
from mmspec.loops import block_generate, masked_generate, required_cache_len, speculative_generate
from mmspec.methods import MethodRegistry
from mmspec.rules import ACCEPTANCE_RULES, get_acceptance_rule
from mmspec.stats import SOURCE_ACCEPTED, SOURCE_NONE, SOURCE_PREFILL, SOURCE_RECOVERED
from mmspec.types import (
    Categorical,
    CommitMode,
    DiagonalGaussian,
    Draft,
    Regeneration,
    Scores,
    TokenPrompt,
    Verdict,
)

from ..conftest import tiny_lm

# ----------------------------------------------------------------------------------------------
# A new rule and a new drafter, from outside the engine, through the unchanged causal loop
# ----------------------------------------------------------------------------------------------


class RepeatLastDrafter:
    """Toy drafter: proposes the last committed token k times (deterministic, stateless)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def prefill(self, ctx, prompt, prefill) -> None:
        pass

    def verify_width(self, num_draft_tokens: int) -> int:
        return num_draft_tokens + 1

    def draft(self, ctx, num_draft_tokens, generator) -> Draft:
        return Draft(ctx.last_tokens[:, None].expand(-1, num_draft_tokens).clone())

    def commit(self, ctx, verdict) -> None:
        pass


class AcceptFirstOnly(AcceptanceRule):
    """Toy prefix rule: keeps at most the first draft if it is the argmax; then the argmax."""

    name = "test-accept-first-only"
    lossless = True
    bound = "greedy decoding, at most one draft per step"
    requires_greedy = True

    def verify(self, draft, target, generator):
        best = self._probs(target).argmax(-1)  # [B, k + 1]
        num_accepted = (draft.tokens[:, 0] == best[:, 0]).long()
        tokens = torch.full((best.shape[0], draft.tokens.shape[1] + 1), -1, dtype=torch.long)
        tokens[:, 0] = torch.where(num_accepted == 1, draft.tokens[:, 0], best[:, 0])
        tokens[:, 1] = torch.where(num_accepted == 1, best[:, 1], -1)
        return Verdict(num_accepted, tokens, is_bonus=torch.zeros_like(num_accepted, dtype=torch.bool))


def _lm_run(target, drafter, acceptance, prompts, max_new=12, k=3):
    prompt = TokenPrompt.from_lists(prompts)
    window = 1 if drafter is None else drafter.verify_width(k)
    cache = target.new_cache(len(prompts), required_cache_len(prompt.tokens.shape[1], max_new, window))
    from mmspec.sampling import SamplingConfig

    return speculative_generate(
        target,
        prompt,
        cache,
        max_new_tokens=max_new,
        drafter=drafter,
        num_draft_tokens=k,
        sampling=SamplingConfig(temperature=0),
        acceptance=acceptance,
        generator=torch.Generator().manual_seed(0),
    )


def test_a_new_rule_and_drafter_plug_into_the_causal_loop():
    target = tiny_lm(vocab_size=12, dim=16, n_layer=1, n_head=2, seed=3)
    prompts = [[1, 1, 1, 1], [2, 3]]
    base = _lm_run(target, None, "greedy", prompts)
    register_acceptance_rule(AcceptFirstOnly)
    try:
        out = _lm_run(target, RepeatLastDrafter(12), "test-accept-first-only", prompts)
    finally:
        del ACCEPTANCE_RULES[AcceptFirstOnly.name]
    assert torch.equal(out.tokens, base.tokens)
    assert int(out.stats.row_accepted.max()) <= out.stats.steps  # at most one draft per step
    sources = out.stats.token_source
    assert set(sources.unique().tolist()) <= {SOURCE_PREFILL, SOURCE_ACCEPTED, SOURCE_RECOVERED}


def test_prefix_verdict_sources_replace_padding():
    verdict = Verdict(
        torch.tensor([0, 2, 3]),
        torch.tensor([[5, -1, -1, -1], [1, 2, 7, -1], [1, 2, 3, 4]]),
        is_bonus=torch.tensor([False, False, True]),
    )
    r, a, b, n = SOURCE_RECOVERED, SOURCE_ACCEPTED, 3, SOURCE_NONE
    assert verdict.source is None  # derived on demand: the causal loop's steps do not pay for it
    assert verdict.sources().tolist() == [[r, n, n, n], [a, a, r, n], [a, a, a, b]]
    assert verdict.accepted.sum(1).tolist() == [0, 2, 3] and verdict.commit is CommitMode.PREFIX


def test_each_loop_refuses_rules_that_commit_otherwise():
    target = tiny_lm(vocab_size=12, dim=16, n_layer=1, n_head=2)
    with pytest.raises(ValueError, match="commits elementwise.*masked_generate"):
        _lm_run(target, RepeatLastDrafter(12), "elementwise-exact", [[1, 2]])
    with pytest.raises(ValueError, match="commits block.*block_generate"):
        _lm_run(target, RepeatLastDrafter(12), get_acceptance_rule("score-threshold", tau=0.5), [[1, 2]])
    toy = IndependentSet(torch.rand(2, 4, 5).softmax(-1))
    with pytest.raises(ValueError, match="commits prefix.*speculative_generate"):
        masked_generate(toy, SetDrafter(torch.rand(4, 5).softmax(-1)), None, acceptance="exact")
    with pytest.raises(ValueError, match="commits prefix"):
        block_generate(
            ToyVideo(0.0),
            None,
            num_blocks=2,
            drafter=ToyVideo(1.0),
            router="exact",
            scorer=lambda block, condition: block.flatten(2).mean(-1),
        )
    with pytest.raises(TypeError, match="Categorical"):
        get_acceptance_rule("exact").verify(Draft(torch.zeros(1, 1, dtype=torch.long)), torch.ones(1, 2, 3) / 3, None)


# ----------------------------------------------------------------------------------------------
# Elementwise rules through the masked loop
# ----------------------------------------------------------------------------------------------


class IndependentSet:
    """A synthetic masked target: ``N`` positions with fixed, independent categorical distributions
    ``probs [B, N, V]`` (what MAR's one-step prediction of a set looks like to the rule); it
    regenerates a position by sampling its own distribution."""

    def __init__(self, probs: torch.Tensor) -> None:
        self.probs = probs
        self.num_elements = probs.shape[1]
        self.steps = 0
        self.tokens = torch.full(probs.shape[:2], -1, dtype=torch.long)

    @property
    def elements(self) -> torch.Tensor:
        return self.tokens

    def prefill(self, condition) -> None:
        pass

    def finished(self) -> torch.Tensor:
        return (self.tokens >= 0).all(1)

    def write(self, positions, elements, mask) -> None:
        self.tokens = self.tokens.scatter(1, positions, torch.where(mask, elements, self.tokens.gather(1, positions)))

    def verify(self, positions) -> Categorical:
        self.steps += 1
        return Categorical(self.probs.gather(1, positions[..., None].expand(-1, -1, self.probs.shape[-1])))

    def regenerate(self, positions, mask, generator) -> Regeneration:
        if bool(mask.any()):
            self.steps += 1
            drawn = torch.multinomial(self.probs.flatten(0, 1), 1, generator=generator).view(self.tokens.shape)
            self.write(positions, drawn.gather(1, positions), mask)
        return Regeneration(step=torch.where(mask, self.steps, -1))


class SetDrafter:
    """Drafts every position at once from fixed proposals ``q [N, V]``, two halves per call."""

    def __init__(self, q: torch.Tensor, chunks: int = 2) -> None:
        self.q, self.chunks, self.forwards, self.next = q, chunks, 0, 0

    def draft(self, condition, target, generator) -> Draft:
        batch, num = target.elements.shape
        size = num // self.chunks
        positions = torch.arange(self.next, self.next + size).expand(batch, -1)
        self.next += size
        self.forwards += 1
        q = self.q[positions[0]].expand(batch, -1, -1)  # [B, k, V]
        tokens = torch.multinomial(q.flatten(0, 1), 1, generator=generator).view(batch, size)
        return Draft(tokens, draft_probs=q, positions=positions)


def _tvd_bound(n: int, vocab: int) -> float:
    """3x the expected TVD of an exact sampler's empirical law over ``vocab`` outcomes from ``n`` draws."""
    return 3 * math.sqrt(vocab / (2 * math.pi * n))


class TooGenerous(AcceptanceRule):
    """A deliberately wrong elementwise rule: accepts every draft (the test must catch it)."""

    name = "test-too-generous"
    lossless = True
    bound = "none (wrong on purpose)"
    commit = CommitMode.ELEMENTWISE

    def verify(self, draft, target, generator):
        source = torch.full(draft.tokens.shape, SOURCE_ACCEPTED)
        return Verdict.elementwise(draft.tokens, source)


@pytest.mark.parametrize("rule, lossless", [("elementwise-exact", True), (TooGenerous(), False)])
def test_elementwise_exact_reproduces_each_positions_law(rule, lossless):
    """Every position of the output follows the target's own distribution (4 positions, 5 tokens,
    very different draft proposals); a rule that accepts too often fails the same check."""
    n, num, vocab = 8000, 4, 5
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(num, vocab, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(num, vocab, generator=g) * 1.5, -1)
    target = IndependentSet(p.expand(n, -1, -1))
    out = masked_generate(target, SetDrafter(q), None, acceptance=rule, generator=g)
    empirical = torch.stack([torch.bincount(out.elements[:, i], minlength=vocab) / n for i in range(num)])
    tvd = 0.5 * (empirical - p).abs().sum(-1).max()
    assert (tvd < _tvd_bound(n, vocab)) == lossless
    assert out.stats.steps == 2 and out.stats.draft_steps == 2  # two drafted halves, one verify each
    src = out.stats.token_source
    assert bool(((src == SOURCE_ACCEPTED) | (src == SOURCE_RECOVERED)).all())


def test_handed_back_elements_are_regenerated_by_the_target():
    """A rule that hands back every other element: the target regenerates exactly those, over
    rounds until nothing is rejected; stats record who produced each element."""

    class HandBackOdd(AcceptanceRule):
        name = "test-hand-back-odd"
        lossless = False
        bound = "none"
        commit = CommitMode.ELEMENTWISE

        def verify(self, draft, target, generator):
            pending = draft.pending
            odd = (draft.positions % 2 == 1) & pending
            source = torch.where(pending & ~odd, SOURCE_ACCEPTED, SOURCE_NONE)
            return Verdict.elementwise(draft.tokens, source, regenerate=odd)

    p = torch.softmax(torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(1)), -1)
    target = IndependentSet(p)
    out = masked_generate(
        target,
        SetDrafter(torch.full((6, 4), 0.25), chunks=1),
        None,
        acceptance=HandBackOdd(),
        max_rounds=3,
        generator=torch.Generator().manual_seed(2),
    )
    src = out.stats.token_source
    assert (src[:, 1::2] == SOURCE_RECOVERED).all() and (src[:, ::2] == SOURCE_ACCEPTED).all()
    assert out.stats.rounds.tolist() == [2, 2, 2] and bool(out.stats.converged.all())
    assert out.stats.steps == 3  # verify, regenerate, verify (nothing left to reject)


def _ks_distance(z: torch.Tensor) -> float:
    """Kolmogorov–Smirnov distance between the empirical law of ``z`` and N(0, 1)."""
    z, _ = z.double().sort()
    n = z.numel()
    cdf = torch.special.ndtr(z)
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n
    return float(torch.maximum(upper - cdf, cdf - (upper - 1 / n)).max())


def test_gaussian_exact_commits_target_samples():
    """CSpD's exact rule on 1-D and 3-D Gaussian pairs (p != q, very different sigmas): KS test of
    the committed elements against p at level 0.001 (critical distance 1.95 / sqrt(n)); the same
    test rejects the draft's own law."""
    rule = get_acceptance_rule("gaussian-exact")
    g = torch.Generator().manual_seed(0)
    n = 6000
    for mean_p, std_p, mean_q, std_q in [(0.0, 1.0, 1.5, 0.3), (0.5, 0.2, -0.5, 2.0)]:
        for channels in (1, 3):
            shape = (n, 1, channels)
            p = DiagonalGaussian(torch.full(shape, mean_p), torch.full(shape, std_p))
            q = DiagonalGaussian(torch.full(shape, mean_q), torch.full(shape, std_q))
            x = q.sample(g)
            verdict = rule.verify(Draft(x, proposal=q), p, g)
            out = verdict.tokens[:, 0]  # [n, C]
            critical = 1.95 / math.sqrt(n)
            for c in range(channels):
                assert _ks_distance((out[:, c] - mean_p) / std_p) < critical
            assert _ks_distance((x[:, 0, 0] - mean_p) / std_p) > 3 * critical
            assert bool(verdict.accepted.any()) and bool((~verdict.accepted).any())  # both paths ran


def test_gaussian_ks_check_catches_a_wrong_residual():
    """The same KS check fails for a rule whose rejected drafts are replaced by plain target samples
    (the residual max(0, p - q) ignored): the output over-weights where p and q overlap."""
    from mmspec.elementwise import GaussianExactAcceptance

    class PlainResample(GaussianExactAcceptance):
        def residual_sample(self, p, q, generator):
            return p.sample(generator)

    g = torch.Generator().manual_seed(0)
    n = 6000
    p = DiagonalGaussian(torch.zeros(n, 1, 1), torch.ones(n, 1, 1))
    q = DiagonalGaussian(torch.full((n, 1, 1), 1.0), torch.full((n, 1, 1), 0.5))
    out = PlainResample().verify(Draft(q.sample(g), proposal=q), p, g).tokens[:, 0, 0]
    assert _ks_distance(out) > 1.95 / math.sqrt(n)


def test_gaussian_residual_sampler_falls_back_to_a_target_sample():
    """With p == q the residual is empty: every try fails and the sampler returns a plain sample
    from p (never zeros, unlike the reference code)."""
    rule = get_acceptance_rule("gaussian-exact", max_tries=3)
    p = DiagonalGaussian(torch.full((4000, 1, 2), 2.0), torch.full((4000, 1, 2), 0.5))
    out = rule.residual_sample(p, p, torch.Generator().manual_seed(0))
    assert not bool((out == 0).any())
    assert abs(float(out.mean()) - 2.0) < 0.05 and abs(float(out.std()) - 0.5) < 0.05
    with pytest.raises(ValueError, match="max_tries"):
        get_acceptance_rule("gaussian-exact", max_tries=0)


# ----------------------------------------------------------------------------------------------
# A block router through the block loop
# ----------------------------------------------------------------------------------------------


class ToyVideo:
    """A synthetic block-causal generator: block i = mean of the cached blocks + ``bias`` + noise
    (``[B, 1, F=2, C=1, 2, 2]``); the cache is the list of committed blocks."""

    def __init__(self, bias: float) -> None:
        self.bias = bias
        self.cache: list[torch.Tensor] = []
        self.generated = 0

    def prefill(self, condition) -> None:
        self.condition = condition

    def generate_block(self, index, generator) -> torch.Tensor:
        self.generated += 1
        context = torch.stack(self.cache).mean(0) if self.cache else torch.zeros(3, 1, 2, 1, 2, 2)
        return context + self.bias + torch.randn(3, 1, 2, 1, 2, 2, generator=generator)

    def write_block(self, index, block) -> None:
        assert index == len(self.cache)
        self.cache.append(block)


def _frame_scores(block: torch.Tensor, condition) -> torch.Tensor:
    return block.flatten(3).mean(-1)[:, 0]  # [B, F]


def _video(tau=None, drafter_bias=3.0, seed=0, num_blocks=4):
    target = ToyVideo(0.0)
    drafter = None if tau is None else ToyVideo(drafter_bias)
    router = None if tau is None else get_acceptance_rule("score-threshold", tau=tau)
    out = block_generate(
        target,
        None,
        num_blocks=num_blocks,
        drafter=drafter,
        router=router,
        scorer=None if tau is None else _frame_scores,
        generator=torch.Generator().manual_seed(seed),
    )
    return out, target, drafter


def test_block_router_extremes_reproduce_target_only_and_draft_only():
    target_only, _, _ = _video()
    rejected_all, target, _ = _video(tau=math.inf)
    assert torch.equal(rejected_all.blocks, target_only.blocks)  # bit for bit
    assert rejected_all.stats.draft_blocks == 0 and rejected_all.stats.target_blocks == 12
    accepted_all, target, drafter = _video(tau=-math.inf)
    assert torch.equal(accepted_all.blocks[:, :1], target_only.blocks[:, :1])  # the forced first block
    # draft-only after the first block: the drafter's own continuation from the committed blocks
    from mmspec.loops import fork_generator

    replay = ToyVideo(3.0)
    replay.write_block(0, target_only.blocks[:, :1])
    g = fork_generator(torch.Generator().manual_seed(0))
    for i in range(1, 4):
        block = replay.generate_block(i, g)
        replay.write_block(i, block)
        assert torch.equal(accepted_all.blocks[:, i : i + 1], block)
    assert target.generated == 1  # the target only generated the forced block
    src = accepted_all.stats.token_source
    assert (src[:, 0] == SOURCE_PREFILL).all() and (src[:, 1:] == SOURCE_ACCEPTED).all()


def test_block_router_mixes_rows_and_reports_scores():
    out, _, _ = _video(tau=1.2, drafter_bias=1.0, seed=3)
    src = out.stats.token_source[:, 1:]
    assert bool((src == SOURCE_ACCEPTED).any()) and bool((src == SOURCE_RECOVERED).any())
    scores = out.stats.scores[:, 1:]
    assert bool((scores[src == SOURCE_ACCEPTED] >= 1.2).all()) and bool((scores[src == SOURCE_RECOVERED] < 1.2).all())
    assert out.stats.draft_blocks + out.stats.target_blocks == 12
    assert out.stats.summary()["block_acceptance_rate"] == pytest.approx(out.stats.acceptance_rate)


def test_router_aggregates_and_errors():
    values = torch.tensor([[0.9, 0.2, 0.8], [0.6, 0.7, 0.65]])
    draft = Draft(torch.zeros(2, 1, 3))
    assert get_acceptance_rule("score-threshold", tau=0.5).verify(draft, Scores(values), None).accepted[
        :, 0
    ].tolist() == [False, True]
    assert get_acceptance_rule("score-threshold", tau=0.6, aggregate="mean").verify(
        draft, Scores(values), None
    ).accepted[:, 0].tolist() == [True, True]
    for bad in [dict(tau=float("nan")), dict(tau=0.5, aggregate="max"), dict(tau=0.5, quantile=2.0)]:
        with pytest.raises(ValueError):
            get_acceptance_rule("score-threshold", **bad)
    with pytest.raises(ValueError, match="router"):
        block_generate(ToyVideo(0), None, num_blocks=2, drafter=ToyVideo(1))
    with pytest.raises(ValueError, match="num_blocks"):
        block_generate(ToyVideo(0), None, num_blocks=0)


# ----------------------------------------------------------------------------------------------
# Method registries
# ----------------------------------------------------------------------------------------------


def test_method_registry():
    registry = MethodRegistry("ToyPipeline")

    @registry.register("toy", options={"width": 2}, requires=("drafter",))
    def _toy(pipe, options):
        """Toy method: proposes the last token."""
        return RepeatLastDrafter(options["width"])

    class Pipe:
        drafter = None

    method = registry.get("toy")
    assert method.description == "Toy method: proposes the last token." and method.loop == "causal"
    assert registry.available(Pipe()) == [] and method.missing(Pipe()) == ["drafter"]
    assert method.resolve_options({"width": 3}) == {"width": 3} and method.resolve_options(None) == {"width": 2}
    with pytest.raises(ValueError, match="unknown option"):
        method.resolve_options({"depth": 1})
    with pytest.raises(ValueError, match="available: \\['toy'\\]"):
        registry.get("nope")
    with pytest.raises(ValueError, match="already"):
        registry.register("toy")(_toy)
    with pytest.raises(ValueError, match="loop"):
        registry.register("bad", loop="sideways")(_toy)
    assert method.accepts(get_acceptance_rule("exact")) and not method.accepts(get_acceptance_rule("elementwise-exact"))


def test_registries_list_mulo_like_every_other_method(tmp_path):
    """MuLo-SD is one more registered method: the image demo's method list and the ar-image
    bench read it from the registry whenever the pipeline has a low-resolution drafter."""
    from mmspec.app.demos.image_app import runnable_methods
    from mmspec.pipelines.llamagen import LLAMAGEN_METHODS, LlamaGenPipeline

    from ..conftest import tiny_llamagen

    assert {"sjd", "draft-model", "eagle", "mulo"} <= set(LLAMAGEN_METHODS.names())
    gpt, vq = tiny_llamagen(grid=4)
    low, _ = tiny_llamagen(grid=2, seed=1, dim=16, n_layer=1)
    assert "mulo" not in runnable_methods(LlamaGenPipeline(target=gpt, vq=vq))
    pipe = LlamaGenPipeline(target=gpt, vq=vq, low_res_drafter=low)
    assert runnable_methods(pipe) == ["mc-sjd", "mulo", "sjd"]
    assert LLAMAGEN_METHODS.get("mulo").loop == "masked" and LLAMAGEN_METHODS.get("mulo").default_rule == "mulo"


def test_heatmaps_from_every_loop():
    """The acceptance heat-map is drawn from the shared stats fields of all three loops."""
    from mmspec.app.visualize import acceptance_heatmap
    from mmspec.pipelines.llamagen import LlamaGenPipeline

    from ..conftest import tiny_llamagen

    gpt, vq = tiny_llamagen(grid=4)
    low, _ = tiny_llamagen(grid=2, seed=1, dim=16, n_layer=1)
    pipe = LlamaGenPipeline(target=gpt, vq=vq, low_res_drafter=low)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    stats = {
        "causal": pipe(class_labels=[1], speculative="sjd", generator=generator, output_type="pt").stats,
        "masked": pipe(
            class_labels=[1],
            speculative="mulo",
            acceptance_options={"tau": 0.05},
            generator=generator,
            output_type="pt",
        ).stats,
        "block": _video(tau=1.2, drafter_bias=1.0, seed=3)[0].stats,
    }
    for name, s in stats.items():
        source, step = s.token_source[0], s.token_step[0]
        side = 4 if name != "block" else 1
        image = acceptance_heatmap(source.view(side, -1), step.view(side, -1), cell=4)
        assert image.size == (4 * source.numel() // side, 4 * side), name
        assert len(set(image.getdata())) > 1, name  # sources/steps are visible


def test_what_leaves_the_masked_and_block_loops_is_not_an_inference_tensor():
    """Both loops run in inference mode (as the causal loop: tests/core/test_loop.py); their outputs,
    stats and what a callback keeps must stay writable outside it (CSpD records its prefill after the
    loop, in place on the stats)."""
    kept = []
    p = torch.softmax(torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0)), -1)
    masked = masked_generate(
        IndependentSet(p),
        SetDrafter(torch.full((6, 4), 0.25)),
        None,
        acceptance="elementwise-exact",
        generator=torch.Generator().manual_seed(1),
        callback=lambda steps, elements: kept.append(elements + 0),
    )
    block = block_generate(
        ToyVideo(0.0),
        None,
        num_blocks=3,
        drafter=ToyVideo(3.0),
        router=get_acceptance_rule("score-threshold", tau=0.5),
        scorer=_frame_scores,
        generator=torch.Generator().manual_seed(2),
        callback=lambda index, blocks: kept.append(blocks + 0),
    )
    tensors = [masked.elements, block.blocks, *kept]
    for stats in (masked.stats, block.stats):
        tensors += [v for v in vars(stats).values() if isinstance(v, torch.Tensor)]
    assert len(kept) >= 4 and not any(t.is_inference() for t in tensors)
    masked.stats.row_accepted += 1
    block.blocks.zero_()
