"""Strict weight loading: a checkpoint whose tensors do not match the model it is loaded into is a
clear error naming the component and the keys, never a warning followed by a cryptic failure
(uninitialised ``meta`` tensors, a ``TypeError`` from a config)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Keys listed per kind in a message (the count says how many there are in all).
SHOWN = 8


def _list(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:SHOWN])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > SHOWN else shown


def weights_mismatch(
    component: str, source: str, expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]]
) -> str | None:
    """A message describing how the tensor names and shapes ``found`` in ``source`` differ from
    those the ``component`` ``expected``, or None when they match exactly."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"missing keys: {_list(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_list(unexpected)}")
    if shapes:
        parts.append(
            "shape mismatches: "
            + _list([f"{k} (checkpoint {tuple(found[k])}, model {tuple(expected[k])})" for k in shapes])
        )
    return (
        f"the weights of {component} in {source} do not match its config ({'; '.join(parts)}): the folder holds "
        "another model's weights, or weights from another version of this model"
    )


def check_weights(
    component: str, source: str, expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]]
) -> None:
    """``ValueError`` with :func:`weights_mismatch`'s message if the two differ."""
    message = weights_mismatch(component, source, expected, found)
    if message is not None:
        raise ValueError(message)


def load_checked(module: torch.nn.Module, weights: Mapping[str, torch.Tensor], component: str, source: str) -> None:
    """``module.load_state_dict(weights)`` after :func:`check_weights` (names and shapes), so a mismatch is
    a ``ValueError`` naming ``component``, ``source`` and the keys, not torch's long ``RuntimeError``."""
    check_weights(
        component,
        source,
        {k: tuple(v.shape) for k, v in module.state_dict().items()},
        {k: tuple(v.shape) for k, v in weights.items()},
    )
    module.load_state_dict(weights)
