"""The compiled fast path must give the eager results (CPU: inductor default mode; CUDA graphs
are exercised by the GPU benchmarks)."""

import pytest
import torch

from mmspec.compile import CompiledTarget
from mmspec.loops import required_cache_len, speculative_generate
from mmspec.sampling import SamplingConfig

from ..conftest import tiny_llamagen


@pytest.mark.slow
def test_compiled_llamagen_baseline_equals_eager():
    """fullgraph=True: the decode step (2-D RoPE, CFG pair, static cache writes, masks) compiles
    without graph breaks, and sampling from the compiled model reproduces the eager tokens."""
    from mmspec.pipelines.llamagen import LlamaGenCondition

    gpt, _ = tiny_llamagen(dim=16, n_layer=1)
    compiled = CompiledTarget(gpt)
    sampling = SamplingConfig(temperature=1.0, top_k=8, guidance_scale=2.0)
    runs = []
    for target in (gpt, compiled):
        cache = target.new_cache(2, required_cache_len(1, 9, 1), cfg=True)
        out = speculative_generate(
            target,
            LlamaGenCondition(class_labels=torch.tensor([1, 3])),
            cache,
            max_new_tokens=9,
            sampling=sampling,
            generator=torch.Generator().manual_seed(0),
        )
        runs.append(out.tokens)
    assert torch.equal(runs[0], runs[1])
    assert compiled.mode == "default" and compiled.vocab_size == gpt.vocab_size


@pytest.mark.slow
def test_compiled_draft_steps_equal_eager():
    """enable_compile compiles the drafters' steps too (the draft GPT's forward, the EAGLE head's),
    once per pipeline: greedy draft-model and EAGLE through the compiled pipeline give the eager
    tokens, and a second call reuses the same compiled steps."""
    from ..pipelines.llamagen.test_pipeline_common import tiny_pipeline

    eager = tiny_pipeline()
    compiled = type(eager)(**eager.components).enable_compile()
    steps = dict(compiled._compiled_steps)
    assert set(steps) == {"drafter", "eagle"}
    for method in ("draft-model", "eagle"):
        runs = [
            pipe(
                class_labels=[1, 2],
                guidance_scale=2.0,
                temperature=0.0,
                speculative=method,
                num_draft_tokens=3,
                output_type="pt",
            ).tokens
            for pipe in (eager, compiled, compiled)
        ]
        assert torch.equal(runs[0], runs[1]) and torch.equal(runs[1], runs[2])
    drafter = compiled.resolve_speculation("draft-model").drafter
    assert drafter.model is steps["drafter"][1] and compiled._compiled_steps == steps
    assert compiled.resolve_speculation("eagle").drafter.step is steps["eagle"][1]
