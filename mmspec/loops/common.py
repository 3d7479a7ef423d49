"""What the three loops share: rule resolution by commit mode, the generator discipline and
profiling syncs."""

from __future__ import annotations

import torch

from ..acceptance import AcceptanceRule
from ..rules import get_acceptance_rule
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


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA): only with ``profile=True``, to time phases separately."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # deliberate: profiling only
