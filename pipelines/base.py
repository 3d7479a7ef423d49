"""What every mmspec pipeline shares: a registry of speculative methods, acceptance rules built
from the pipeline's own models, and the resolution of one call's method, drafter and rule
(``speculative=None`` is the plain autoregressive baseline through the same code), and turning
decoded images into the requested ``output_type``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch

from mmspec.acceptance import AcceptanceRule
from mmspec.cpu_linear import PACK_MIN_ELEMENTS, pack_linear_layers
from mmspec.loops import GenerationOutput, speculative_generate
from mmspec.methods import Method, MethodRegistry
from mmspec.rules import ACCEPTANCE_RULES, get_acceptance_rule
from mmspec.sampling import SamplingConfig


@dataclass
class Speculation:
    """One call's choice: ``method`` (None = baseline), its ``drafter`` (None = baseline),
    ``options`` (the method's, defaults filled in) and the acceptance ``rule``."""

    method: Method | None
    drafter: Any
    options: dict
    rule: AcceptanceRule


class SpeculativePipelineMixin:
    """Mixed into every pipeline class (``LlamaGenPipeline``, ``VLMPipeline``, ...), which sets
    ``methods`` (its :class:`~mmspec.methods.MethodRegistry`) and, if some rules need its models,
    overrides :meth:`rule_resources`."""

    #: The speculative methods this pipeline runs (``speculative=`` names).
    methods: ClassVar[MethodRegistry]

    def rule_resources(self) -> dict:
        """What rules that need this pipeline's models are built from (see
        :meth:`mmspec.acceptance.AcceptanceRule.from_resources`); none by default."""
        return {}

    def enable_cpu_packing(self, min_elements: int = PACK_MIN_ELEMENTS) -> int:
        """Give the target's float32 CPU linear layers of ``min_elements`` or more weights a
        oneDNN-packed copy of their weights, used by forwards over several rows (verify windows,
        prompts, batches), where MKL costs 2-4x a one-row step (:mod:`mmspec.cpu_linear`, which says
        where packing pays). One-row steps keep MKL. Costs those weights' memory once more. Returns
        how many layers were packed (0 on other devices or dtypes, for small models, or without
        oneDNN)."""
        return pack_linear_layers(self._packable(), min_elements)

    def _packable(self) -> torch.nn.Module:
        """What :meth:`enable_cpu_packing` packs: the target (pipelines narrow it)."""
        return self.target

    def acceptance_rule(self, name: str, **options: Any) -> AcceptanceRule:
        """The acceptance rule ``name`` with ``options``, built from this pipeline's models where it
        needs them (only rules that override ``from_resources`` get :meth:`rule_resources`: its tensors
        are not gathered for every call of the plain rules)."""
        rule = ACCEPTANCE_RULES.get(name)
        needs = rule is not None and rule.from_resources.__func__ is not AcceptanceRule.from_resources.__func__
        return get_acceptance_rule(name, self.rule_resources() if needs else None, **options)

    def resolve_speculation(
        self,
        speculative: str | None,
        speculative_options: Mapping[str, Any] | None = None,
        acceptance: str | AcceptanceRule | None = None,
        acceptance_options: Mapping[str, Any] | None = None,
    ) -> Speculation:
        """Check and build one call's method, drafter and rule, or raise a ValueError that says what
        is wrong: an unknown method or option, a missing component, a rule given as an instance with
        options, a rule that commits differently from the method's loop. ``acceptance=None``: the
        method's own rule (``"exact"`` for the baseline)."""
        method = None if speculative is None else self.methods.get(speculative)
        if method is None and speculative_options:
            raise ValueError("speculative_options apply to a speculative method; the baseline has none")
        options = {} if method is None else method.resolve_options(speculative_options)
        drafter = None if method is None else method.build(self, options)
        if isinstance(acceptance, AcceptanceRule):
            if acceptance_options:
                raise ValueError("acceptance_options apply to a rule given by name, not to a rule instance")
            rule = acceptance
        else:
            name = acceptance or (method.default_rule if method is not None else "exact")
            # the loop's commit mode first: a rule of another loop is named as such, whatever its options
            _check_commit(method, ACCEPTANCE_RULES.get(name))
            rule = self.acceptance_rule(name, **dict(acceptance_options or {}))
        _check_commit(method, rule)
        return Speculation(method, drafter, options, rule)


def _check_commit(method: Method | None, rule: AcceptanceRule | type[AcceptanceRule] | None) -> None:
    """ValueError if ``rule`` (an instance or a registered class) commits differently from ``method``'s loop."""
    if method is not None and rule is not None and not method.accepts(rule):
        raise ValueError(
            f"acceptance rule {rule.name!r} commits {rule.commit.value}, but speculative={method.name!r} runs the "
            f"{method.loop} loop: use its own rule {method.default_rule!r} or another {method.loop}-loop rule"
        )


def postprocess_images(images: torch.Tensor, output_type: str, extra: tuple[str, ...] = ()):
    """Images ``[B, 3, H, W]`` in [-1, 1] (a decoder's output) as the pipelines return them:
    ``output_type`` ``"pt"`` (``[B, 3, H, W]`` in [0, 1]), ``"np"`` (``[B, H, W, 3]``) or ``"pil"``;
    ``extra``: further types the caller handles itself, named in the error."""
    images = ((images.float() + 1) / 2).clamp(0, 1)
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return array
    if output_type == "pil":
        return [PIL.Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
    choices = ", ".join(repr(t) for t in ("pil", "np", "pt", *extra))
    raise ValueError(f"output_type must be one of {choices}, got {output_type!r}")


def generate_image_tokens(
    pipe: Any,
    target: Any,
    prompt: Any,
    cache: Any,
    num_tokens: int,
    spec: Any,
    num_draft_tokens: int,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    callback_on_step_end: Callable | None,
    profile: bool = False,
) -> GenerationOutput:
    """``num_tokens`` image tokens through the causal loop, with ``pipe``'s progress bar (one tick per
    token) and ``callback_on_step_end(pipe, step, None, {"num_generated": [B], "tokens": [B, N]})`` after
    every verify step (the AR image pipelines' convention; ``tokens``: the raster-order tokens so far,
    -1 where not generated yet). ``spec``: the call's :class:`Speculation` (drafter and rule).
    ``profile``: the loop's phase timing (``stats.draft_time`` / ``verify_time`` / ``accept_time``)."""
    progress = pipe.progress_bar(total=num_tokens)
    done = [0]  # the bar counts every token (the first comes from the prefill), so it ends at its total

    def on_step(step: int, num_generated: torch.Tensor, ctx) -> None:
        now = int(num_generated.clamp(max=num_tokens).min())  # deliberate sync: progress display
        progress.update(now - done[0])
        done[0] = now
        if callback_on_step_end is not None:
            # Image models have no token prompt: the history is the raster-order token grid so far
            # (-1 where not generated yet); a last step may overshoot the grid, hence the clamp.
            tokens = ctx.history[:, :num_tokens]
            generated = num_generated.clamp(max=num_tokens)
            callback_on_step_end(pipe, step, None, {"num_generated": generated, "tokens": tokens})

    out = speculative_generate(
        target,
        prompt,
        cache,
        max_new_tokens=num_tokens,
        drafter=spec.drafter,
        acceptance=spec.rule,
        num_draft_tokens=num_draft_tokens,
        sampling=sampling,
        generator=generator,
        callback=on_step,
        profile=profile,
    )
    progress.update(num_tokens - done[0])
    progress.close()
    return out
