"""What the three loops share: rule resolution by commit mode, the generator discipline, handing
results out of inference mode, and profiling syncs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from ..acceptance import AcceptanceRule
from ..rules import get_acceptance_rule
from ..stats import SpecStats
from ..types import CommitMode

_LOOP_FOR = {
    CommitMode.PREFIX: "speculative_generate (the causal loop)",
    CommitMode.ELEMENTWISE: "masked_generate (the masked loop)",
    CommitMode.BLOCK: "block_generate (the block loop)",
}


def resolve_rule(rule: str | AcceptanceRule, commit: CommitMode, loop: str) -> AcceptanceRule:
    """The rule ``rule`` (a name or an instance), or a ValueError if it commits differently from
    what ``loop`` can do (e.g. an elementwise rule in the causal loop)."""
    rule = get_acceptance_rule(rule)
    if rule.commit is not commit:
        raise ValueError(
            f"acceptance rule {rule.name!r} commits {rule.commit.value}, but {loop} commits {commit.value}: "
            f"run it with {_LOOP_FOR[rule.commit]}"
        )
    return rule


def fork_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """A generator seeded from ``generator``'s current state WITHOUT advancing it: a drafter's own
    stream, so that the target's draws stay exactly those of the baseline under the same seed.
    None stays None (global RNG)."""
    if generator is None:
        return None
    clone = torch.Generator(device=generator.device)
    clone.set_state(generator.get_state())
    seed = int(torch.randint(0, 2**62, (1,), generator=clone, device=generator.device))  # deliberate sync, once
    return torch.Generator(device=generator.device).manual_seed(seed)


def outside_inference_mode(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` outside inference mode. The loops run in inference mode (a quarter fewer aten ops
    per forward; why: the causal loop's comment), whose tensors cannot be written in place or saved for
    backward outside it: what a callback computes or copies must outlive the loop as a normal tensor."""
    with torch.inference_mode(False):
        return fn(*args)


def hand_back(stats: SpecStats, *results: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A loop's last act: normal copies of its ``results`` and of ``stats``' tensors (callers train on
    outputs and pipelines trim stats again, in place; see :func:`outside_inference_mode`)."""
    stats.leave_inference_mode()
    with torch.inference_mode(False):
        return tuple(result.clone() for result in results)


def clock(profile: bool, device: torch.device) -> float:
    """``time.perf_counter()``; with ``profile``, after waiting for the device (CUDA), so that the time
    between two clocks is the work of the phase between them."""
    if profile and device.type == "cuda":
        torch.cuda.synchronize(device)  # deliberate: profiling only
    return time.perf_counter()
