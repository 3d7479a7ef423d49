"""oneDNN-packed linear layers (mmspec.cpu_linear): same values as F.linear, the right kernel per input,
never stale weights, and speculative decoding through a packed target still equals the baseline."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmspec.cpu_linear import PACK_ROWS, PackedLinear, cpu_packing_available, pack_linear_layers, unpack_linear_layers

pytestmark = pytest.mark.skipif(not cpu_packing_available(), reason="this torch build has no oneDNN linear ops")


def _linear(bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(48, 80, bias=bias).eval()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (1, 1, 48), (5, 48), (2, 7, 48)])
def test_packed_layer_computes_the_linear_map(bias, shape):
    linear = _linear(bias)
    packed = PackedLinear(linear)
    x = torch.randn(shape)
    with torch.no_grad():
        got, want = packed(x), linear(x)
    assert got.shape == want.shape
    if x.numel() == x.shape[-1]:  # one row: F.linear itself
        assert torch.equal(got, want)
    else:  # another kernel: float32 rounding only
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_several_rows_use_the_packed_copy_and_one_row_the_weight():
    """Swap the packed copy for that of a doubled weight: only several-row inputs see it."""
    linear = _linear(bias=False)
    packed = PackedLinear(linear)
    packed.packed_weight = torch.ops.mkldnn._reorder_linear_weight(2 * linear.weight.detach(), PACK_ROWS)
    with torch.no_grad():
        rows = torch.randn(4, 48)
        torch.testing.assert_close(packed(rows), 2 * linear(rows), rtol=1e-5, atol=1e-5)
        one = torch.randn(1, 48)
        assert torch.equal(packed(one), linear(one))


def test_gradients_and_changed_weights_fall_back_to_f_linear():
    linear = _linear()
    packed = PackedLinear(linear)
    x = torch.randn(6, 48)
    with torch.enable_grad():  # (the suite's conftest turns gradients off by default)
        out = packed(x)  # trainable weight: the reference path, with a graph
        out.sum().backward()
    assert torch.equal(out, F.linear(x, linear.weight, linear.bias)) and out.requires_grad
    assert linear.weight.grad is not None
    with torch.no_grad():
        linear.weight.mul_(3.0)  # the packed copy is stale now
        assert torch.equal(packed(x), F.linear(x, linear.weight, linear.bias))


def test_pack_and_unpack_swap_layers_in_place_sharing_parameters():
    model = nn.Sequential(_linear(), nn.ReLU(), nn.Sequential(_linear(seed=1)), nn.Linear(4, 4).double())
    keys = list(model.state_dict())
    weights = [model[0].weight, model[2][0].weight]
    assert pack_linear_layers(model) == 0  # below the size where packing pays
    assert pack_linear_layers(model, min_elements=0) == 2  # the float64 layer is left alone
    assert isinstance(model[0], PackedLinear) and isinstance(model[2][0], PackedLinear)
    assert type(model[3]) is nn.Linear
    assert list(model.state_dict()) == keys  # the packed copies are not saved
    assert model[0].weight is weights[0] and model[2][0].weight is weights[1]
    assert pack_linear_layers(model, min_elements=0) == 0  # packed already
    clone = copy.deepcopy(model)  # repacks the copied parameters
    assert isinstance(clone[0], PackedLinear) and clone[0].weight is not model[0].weight
    assert torch.equal(clone[0].weight, model[0].weight)
    rows = torch.randn(3, 48)
    assert torch.equal(clone[0](rows), model[0](rows))
    assert unpack_linear_layers(model) == 2
    assert type(model[0]) is nn.Linear and model[0].weight is weights[0] and model[2][0].weight is weights[1]
    with pytest.raises(ValueError, match="float32 CPU"):
        PackedLinear(nn.Linear(4, 4).double())


def test_packed_vlm_target_speculates_exactly_like_the_baseline():
    """A tiny VLM pipeline with packed target layers: the model drafter's greedy replies equal the
    baseline's, which equal the unpacked pipeline's."""
    from mmspec.drafters import ModelDrafter
    from mmspec.pipelines.vlm import VLMPipeline, load_vlm_target

    from ..conftest import noisy_copy
    from ..pipelines.vlm.test_vlm import CASES, tiny_vlm

    model, processor = tiny_vlm("llava")
    images, prompts = CASES["batch"]
    plain = VLMPipeline(load_vlm_target(model), processor)
    expected = plain(images, prompts, max_new_tokens=16, num_draft_tokens=0)
    packed = VLMPipeline(load_vlm_target(model), processor)
    drafter = ModelDrafter(packed.target.with_decoder(noisy_copy(packed.target.decoder, 0.05)))
    assert packed.enable_cpu_packing() == 0  # the tiny model's layers are below PACK_MIN_ELEMENTS
    assert packed.enable_cpu_packing(min_elements=0) > 0
    assert not any(isinstance(m, PackedLinear) for m in model.modules())  # the transformers model is untouched
    assert any(isinstance(m, PackedLinear) for m in packed.target.decoder.modules())
    base = packed(images, prompts, max_new_tokens=16, num_draft_tokens=0)
    spec = packed(images, prompts, max_new_tokens=16, num_draft_tokens=3, drafter=drafter)
    assert torch.equal(base.token_ids, expected.token_ids) and torch.equal(spec.token_ids, expected.token_ids)
    assert spec.stats.steps < base.stats.steps
