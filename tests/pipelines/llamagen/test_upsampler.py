"""MuLo-SD's learned up-sampler (LlamaGenTokenUpsampler): interface, training, save/load, and its
use by speculative="mulo" (upsampler="learned") — on tiny components."""

from __future__ import annotations

import pytest
import torch

from mmspec.pipelines.llamagen import LlamaGenCondition, LlamaGenPipeline, LlamaGenTokenUpsampler
from mmspec.pipelines.llamagen.mulo import make_upsampler, mulo_generate
from mmspec.sampling import SamplingConfig
from mmspec.training.reference_upsampler import UpsamplerTrainConfig, train_upsampler, upsampler_accuracy

from ...conftest import tiny_llamagen


@pytest.fixture(scope="module")
def pipe() -> LlamaGenPipeline:
    """Target over 6x6, low-resolution drafter over 3x3, an untrained x2 up-sampler, 16 codes."""
    with torch.no_grad():
        gpt, vq = tiny_llamagen(grid=6)
        draft, _ = tiny_llamagen(grid=3, seed=1, dim=16, n_layer=1)
    torch.manual_seed(2)
    upsampler = LlamaGenTokenUpsampler(vocab_size=16, scale=2, dim=32).eval()
    pipe = LlamaGenPipeline(target=gpt, vq=vq, low_res_drafter=draft, upsampler=upsampler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _synthetic_pairs(n: int, seed: int, vocab: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Low grids [n, 3, 3] and their 6x6 'renderings': code c at (i, j) becomes the 2x2 patch
    (c + 2a + b) mod V at (2i + a, 2j + b) — a rule a x2 up-sampler can learn exactly."""
    low = torch.randint(0, vocab, (n, 3, 3), generator=torch.Generator().manual_seed(seed))
    offsets = torch.tensor([[0, 1], [2, 3]])
    high = (low[:, :, None, :, None] + offsets[None, None, :, None, :]) % vocab  # [n, 3, 2, 3, 2]
    return low, high.reshape(n, 6, 6)


def test_shapes_interface_and_errors():
    torch.manual_seed(0)
    model = LlamaGenTokenUpsampler(vocab_size=16, scale=2, dim=32).eval()
    low = torch.randint(0, 16, (2, 3, 4))
    assert model(low).shape == (2, 16, 6, 8)
    up = model.upsample(low, (6, 8))
    assert up.shape == (2, 6, 8) and up.dtype == torch.long and torch.equal(up, model(low).argmax(1))
    with pytest.raises(ValueError, match="scale 2"):
        model.upsample(low, (9, 12))
    with pytest.raises(ValueError, match="another codebook"):
        model.upsample(torch.full((1, 3, 3), 16), (6, 6))
    with pytest.raises(ValueError, match="multiple of 32"):
        LlamaGenTokenUpsampler(vocab_size=16, dim=48)
    with pytest.raises(ValueError, match="scale"):
        LlamaGenTokenUpsampler(vocab_size=16, scale=0)


def test_training_learns_a_deterministic_upsampling_rule(pipe):
    low, high = _synthetic_pairs(512, seed=0)
    test_low, test_high = _synthetic_pairs(64, seed=1)
    config = UpsamplerTrainConfig(dim=32, steps=150, batch_size=32, lr=5e-3, warmup_steps=10, progress=False)
    torch.manual_seed(0)
    untrained = LlamaGenTokenUpsampler(vocab_size=16, scale=2, dim=32).eval()
    assert upsampler_accuracy(untrained.upsample, test_low, test_high) < 0.3
    model = train_upsampler(pipe.vq, config, low, high)
    assert upsampler_accuracy(model.upsample, test_low, test_high) > 0.95
    with pytest.raises(ValueError, match="not pairs"):
        train_upsampler(pipe.vq, config, low, high[:, :5])
    with pytest.raises(ValueError, match="not pairs"):
        train_upsampler(pipe.vq, config, low, high[:, :, :5])


def test_pipeline_saves_and_loads_the_upsampler(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "with")
    loaded = LlamaGenPipeline.from_pretrained(tmp_path / "with")
    low = torch.randint(0, 16, (2, 3, 3), generator=torch.Generator().manual_seed(3))
    assert torch.equal(loaded.upsampler.upsample(low, (6, 6)), pipe.upsampler.upsample(low, (6, 6)))
    # a folder saved without one (e.g. before the component existed) still loads
    LlamaGenPipeline(target=pipe.target, vq=pipe.vq, low_res_drafter=pipe.low_res_drafter).save_pretrained(
        tmp_path / "without"
    )
    assert LlamaGenPipeline.from_pretrained(tmp_path / "without").upsampler is None


def test_mulo_uses_the_learned_upsampler(pipe):
    """tau = 0 keeps every candidate, so the output is exactly the up-sampler's grid of the
    drafter's tokens: the pipeline's learned model with upsampler="learned", the training-free one
    otherwise."""
    condition = LlamaGenCondition(class_labels=torch.tensor([0, 3]))
    sampling = SamplingConfig(guidance_scale=2.0)
    seen = []

    def recording(tokens, size):
        seen.append(tokens)
        return pipe.upsampler.upsample(tokens, size)

    kw = dict(
        class_labels=[0, 3], guidance_scale=2.0, speculative="mulo", acceptance_options={"tau": 0.0}, output_type="pt"
    )
    out = pipe(**kw, speculative_options={"upsampler": "learned"}, generator=torch.Generator().manual_seed(4))
    tokens, stats = out.tokens, out.stats
    explicit, _ = mulo_generate(
        pipe.target,
        pipe.low_res_drafter,
        condition,
        sampling,
        recording,
        torch.Generator().manual_seed(4),
        acceptance_options={"tau": 0.0},
    )
    assert torch.equal(tokens, explicit) and torch.equal(tokens, pipe.upsampler.upsample(seen[0], (6, 6)))
    assert stats.resampled_fraction == 0.0
    free = pipe(**kw, generator=torch.Generator().manual_seed(4)).tokens
    assert torch.equal(free, make_upsampler("decode-resize-encode", pipe.vq)(seen[0], (6, 6)))
    assert not torch.equal(free, tokens)


def test_clear_errors_for_a_missing_or_mismatched_upsampler(pipe):
    without = LlamaGenPipeline(target=pipe.target, vq=pipe.vq, low_res_drafter=pipe.low_res_drafter)
    with pytest.raises(ValueError, match="train-reference --stage upsampler"):
        without(class_labels=[0], speculative="mulo", speculative_options={"upsampler": "learned"})
    with pytest.raises(ValueError, match="train the upsampler for this pair"):
        LlamaGenPipeline(
            target=pipe.target,
            vq=pipe.vq,
            low_res_drafter=pipe.low_res_drafter,
            upsampler=LlamaGenTokenUpsampler(vocab_size=16, scale=3, dim=32),
        )
    with pytest.raises(ValueError, match="vocabulary"):
        LlamaGenPipeline(target=pipe.target, vq=pipe.vq, upsampler=LlamaGenTokenUpsampler(vocab_size=32, dim=32))
