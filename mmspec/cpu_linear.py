"""oneDNN-packed linear layers for CPU verify forwards.

A verify forward multiplies every weight by ``k + 1`` rows per sequence; a decode step (the baseline,
a draft token) by one. On the CPU, MKL's ``sgemm`` behind ``F.linear`` is fast for one row (its
matrix-vector path reads the weight once) but costs 2-4x that for 2-9 rows, while oneDNN's matmul
over a weight *packed* once into its blocked layout costs less there -- for large weights. Measured
on the development machine's AMD EPYC, one thread (``benchmarks/cpu_linear.py``,
``benchmarks/results/cpu-linear-cpu.json``), microseconds per call, MKL / packed:

==========================  =========  =========  =========  =========
weight (in x out)           1 row      5 rows     9 rows     18 rows
==========================  =========  =========  =========  =========
576 x 1,536 (SmolLM2 MLP)   83 / 100   287 / 196  360 / 271  514 / 475
576 x 576 (SmolLM2 attn.)   34 / 55    116 / 94   141 / 125  192 / 193
192 x 576 (ref. LlamaGen)   17 / 35    38 / 57    48 / 66    68 / 88
==========================  =========  =========  =========  =========

So :class:`PackedLinear` keeps both copies -- one row goes to ``F.linear`` (the reference, and the
faster kernel there), several rows to the packed copy -- and :func:`pack_linear_layers` packs only
weights of at least :data:`PACK_MIN_ELEMENTS` entries. A verify forward of SmolLM2-135M (its MLP,
fused q/k/v and LM-head weights packed) over 5 tokens took 104 ms with MKL and 77 ms packed, next to 54 ms for one
token. The packed copies double the memory of the packed weights, which is why packing is a call a
pipeline makes (``enable_cpu_packing``), not a default. The kernels round differently (float32
sums in another order): as with any change of GEMM kernel between a one-row decode and a
several-row verify, greedy outputs equal the baseline's except at exact near-ties, which the
benchmarks check on every row.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

#: Rows the packed layout is tuned for (oneDNN's batch-size hint): verify windows of 5-9 tokens.
#: Hints from 5 to 16 measured alike; a hint of 1 packs for matrix-vector products and loses the gain.
PACK_ROWS = 8
#: Smallest weight (in x out entries) :func:`pack_linear_layers` packs: 2^19, between the 576 x 576
#: attention projections (0.8-1.1x MKL's time at 2-18 rows over two runs: not worth their copy) and
#: the 576 x 1,536 MLP ones (1.3-1.6x faster at 2-9 rows); the reference LlamaGen's 192-wide layers
#: are slower packed at every row count.
PACK_MIN_ELEMENTS = 2**19


def cpu_packing_available() -> bool:
    """Whether this torch build has the oneDNN linear ops (x86 CPU wheels do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """A float32 CPU ``nn.Linear`` (its parameters, shared) plus a oneDNN-packed copy of its weight,
    used for inputs of more than one row when no gradient is needed.

    The copy is taken at construction: if the weight changes afterwards (its ``_version`` moves), the
    layer falls back to ``F.linear`` rather than use stale values. State dicts are unchanged
    (``weight``, ``bias``; the copy is not saved). The module stays on the CPU: call
    :func:`unpack_linear_layers` before moving or casting it.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.weight.device.type != "cpu" or linear.weight.dtype != torch.float32:
            raise ValueError(
                f"PackedLinear packs float32 CPU weights, got {linear.weight.dtype} on {linear.weight.device}"
            )
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer(
            "packed_weight",
            torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACK_ROWS),
            persistent=False,
        )
        self._packed_version = linear.weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        several_rows = x.numel() > x.shape[-1]
        if (
            several_rows
            and x.dtype == torch.float32
            and self.weight._version == self._packed_version
            and not (torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad))
        ):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with this layer's parameters (shared)."""
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def __deepcopy__(self, memo: dict) -> PackedLinear:
        # The packed copy is an opaque oneDNN tensor, which deepcopy cannot read: copy the layer's
        # parameters and pack the copy again.
        return PackedLinear(copy.deepcopy(self.to_linear(), memo))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linear_layers(module: nn.Module, min_elements: int = PACK_MIN_ELEMENTS) -> int:
    """Replace every float32 CPU ``nn.Linear`` inside ``module`` (itself excluded) whose weight has at
    least ``min_elements`` entries by a :class:`PackedLinear` over the same parameters; returns how
    many were packed (0 when the build has no oneDNN, or nothing qualifies). Layers packed already
    are left as they are."""
    if not cpu_packing_available():
        return 0
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            weight = getattr(child, "weight", None)
            if (
                type(child) is nn.Linear
                and weight.device.type == "cpu"
                and weight.dtype == torch.float32
                and weight.numel() >= min_elements
            ):
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count


def unpack_linear_layers(module: nn.Module) -> int:
    """Undo :func:`pack_linear_layers` (frees the packed copies); returns how many layers it restored."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PackedLinear):
                setattr(parent, name, child.to_linear())
                count += 1
    return count
