"""The shared decoder pieces (:mod:`mmspec.modeling`) against the plain expressions they replace."""

import pytest
import torch

from mmspec.modeling import RMSNorm, apply_rotary_emb, rope_frequencies


def _rotate_pairs(x, freqs):
    """LlamaGen's real-valued rotation: (x0 cos - x1 sin, x1 cos + x0 sin) per adjacent pair."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs[:, :, None]
    out = torch.stack(
        [xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1], xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1]], -1
    )
    return out.flatten(3).type_as(x)


@pytest.mark.parametrize("shape", [(2, 1, 12, 32), (2, 9, 12, 32), (1, 5, 12, 64), (3, 7, 4, 16)])
def test_complex_rotation_is_the_real_rotation_bit_for_bit(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g) * 3
    positions = torch.randint(0, 4096, shape[:2], generator=g)
    freqs = rope_frequencies(positions, shape[-1])
    assert torch.equal(apply_rotary_emb(x, freqs), _rotate_pairs(x, freqs))
    # a slice of a wider projection (q and k inside the fused qkv output), as the attention passes it
    wide = torch.randn(*shape[:2], shape[2] + 2, shape[3], generator=g)[:, :, : shape[2]]
    assert torch.equal(apply_rotary_emb(wide, freqs), _rotate_pairs(wide, freqs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_the_plain_expression(dtype):
    g = torch.Generator().manual_seed(1)
    norm = RMSNorm(96, eps=1e-5)
    norm.weight.data = torch.randn(96, generator=g).to(dtype)
    norm = norm.to(dtype)
    x = (torch.randn(4, 7, 96, generator=g) * 5).to(dtype)
    xf = x.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(x) * norm.weight
    assert torch.equal(norm(x), expected)


def test_cached_rotary_tables_are_normal_tensors_when_first_built_in_inference_mode():
    """The decoding loop runs in inference mode and is often the first to ask for a table; the cached
    table is then shared with training code, which must be able to save slices of it for backward."""
    from mmspec.modeling import rope_table
    from mmspec.pipelines.llamagen.modeling_gpt import llamagen_freqs_table

    with torch.inference_mode():  # sizes no other test asks for, so these calls build the tables
        tables = [
            rope_table(37, 8, 10000.0, torch.device("cpu")),
            llamagen_freqs_table(3, 8, 10000.0, 5, torch.device("cpu")),
        ]
    for table in tables:
        assert not table.is_inference()
        weight = torch.ones((), requires_grad=True)
        with torch.enable_grad():  # the suite runs without grad (conftest)
            (table[:2] * weight).sum().backward()
