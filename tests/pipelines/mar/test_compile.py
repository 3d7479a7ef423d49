"""The compiled MAR path (``MARPipeline.enable_compile``): the MAE pass and the diffusion-head step
are static-shape and free of host syncs, so ``torch.compile`` captures each as one full graph, and
the compiled pipeline reproduces the eager one (baseline and CSpD)."""

from __future__ import annotations

import pytest
import torch

from mmspec.pipelines.mar import MARPipeline

from ...conftest import tiny_mar, tiny_mar_vae

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _pipes(device: str) -> tuple[MARPipeline, MARPipeline]:
    def build() -> MARPipeline:
        pipe = MARPipeline(target=tiny_mar(seed=0), vae=tiny_mar_vae(), drafter=tiny_mar(seed=1, encoder_depth=1))
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    return build(), build().enable_compile()


def _run(pipe: MARPipeline, device: str, **kwargs):
    generator = torch.Generator(device).manual_seed(0)
    return pipe(
        class_labels=[1, 3],
        num_iter=4,
        guidance_scale=2.5,
        output_type="pt",
        generator=generator,
        **kwargs,
    )


def test_head_step_and_mae_pass_capture_as_full_graphs():
    """fullgraph=True raises on any graph break (a host sync, data-dependent control flow)."""
    model = tiny_mar(seed=0)
    explained = torch._dynamo.explain(model.diffloss)(
        torch.randn(3, 4), torch.randn(6, 32), torch.full((3, 1), 2.0), model.diffloss.step_index[1:2]
    )
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    tokens, unknown = torch.randn(2, 16, 4), torch.rand(2, 16) > 0.5
    explained = torch._dynamo.explain(model)(tokens, unknown, torch.tensor([1, 2]), True)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("speculative", [None, "cspd"])
def test_compiled_matches_eager_on_cuda(speculative):
    eager, compiled = _pipes("cuda")
    with torch.no_grad():
        a = _run(eager, "cuda", speculative=speculative, num_draft_tokens=2)
        b = _run(compiled, "cuda", speculative=speculative, num_draft_tokens=2)
        b2 = _run(compiled, "cuda", speculative=speculative, num_draft_tokens=2)  # graph replays
    torch.testing.assert_close(b.latents, a.latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b2.latents, b.latents, rtol=0, atol=0)
    if speculative:
        assert torch.equal(a.stats.token_source, b.stats.token_source)


def test_clip_denoised_clamps_the_predicted_x0_only():
    """None (official) and a bound never reached give the same tokens; a tight bound clamps x0,
    so the last step's mean (~x0 at t = 0) stays within it."""
    z, init, steps = torch.randn(6, 32), torch.randn(6, 4), torch.randn(5, 6, 4)
    official, loose, tight = (tiny_mar(seed=0, clip_denoised=c) for c in (None, 1e9, 0.05))
    with torch.no_grad():
        a, b, c = (m.sample_head(z, None, 1.0, 1.0, init, steps) for m in (official, loose, tight))
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    assert float(c.mean.abs().max()) < 0.1 < float(a.mean.abs().max())
