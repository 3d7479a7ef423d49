"""Checks of batch-job settings (``mmspec generate`` / ``mmspec caption``) made before any model
loads: a setting that is wrong for every item is the command's error (a message and exit code 1),
never a "bad item" logged once per input.

Model-dependent limits (vocabulary, sequence length) are checked right after loading, by the
pipelines' own validation (:mod:`mmspec.pipelines.validation`), still before the first item.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .generators import GenerationFamily


def _fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


def _check_sampling(args: argparse.Namespace, guidance: bool) -> None:
    from ..sampling import SamplingConfig

    try:
        SamplingConfig(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            guidance_scale=args.guidance_scale if guidance else 1.0,
        )
    except ValueError as err:
        _fail(f"{err} (--temperature / --top-k / --top-p{' / --guidance-scale' if guidance else ''})")


def _check_common(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        _fail(f"--batch-size must be >= 1, got {args.batch_size}")


def _looks_local(name: str) -> bool:
    """A path rather than a Hugging Face hub id ("org/name")."""
    return os.path.isabs(name) or name.startswith(".") or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _check_sources(args: argparse.Namespace) -> None:
    if getattr(args, "model", None) is not None and _looks_local(args.model) and not os.path.isdir(args.model):
        _fail(f"--model {args.model}: no such folder")


def _check_greedy_rule(args: argparse.Namespace) -> None:
    from ..rules import ACCEPTANCE_RULES

    rule = ACCEPTANCE_RULES.get(args.acceptance or "")
    if rule is not None and rule.requires_greedy and not (args.temperature == 0 or args.top_k == 1):
        _fail(f"--acceptance {args.acceptance} needs greedy decoding: add --temperature 0 (or --top-k 1)")


def check_generate_settings(args: argparse.Namespace, family: GenerationFamily) -> None:
    """``SystemExit`` with a message if ``mmspec generate``'s settings cannot work for any item of
    ``family``'s models (the family's own checks included)."""
    from ..rules import ACCEPTANCE_RULES

    _check_common(args)
    _check_sampling(args, guidance=True)
    registry = family.methods()
    methods = registry.names()
    if args.speculative != "none" and args.speculative not in methods:
        _fail(
            f"--speculative must be 'none' (the baseline) or one of {', '.join(methods)} ({family.name} models); "
            f"got {args.speculative!r}"
        )
    if args.acceptance is not None and args.acceptance not in ACCEPTANCE_RULES:
        _fail(f"--acceptance must be one of {', '.join(sorted(ACCEPTANCE_RULES))}; got {args.acceptance!r}")
    if args.speculative != "none":
        from .jobs import parse_key_values

        method = registry.get(args.speculative)
        try:  # option names and the rule's commit mode are known without the model
            method.resolve_options(parse_key_values(args.speculative_option, "--speculative-option"))
        except ValueError as err:
            _fail(str(err))
        rule = ACCEPTANCE_RULES.get(args.acceptance or method.default_rule)
        if rule is not None and not method.accepts(rule):
            _fail(
                f"--acceptance {rule.name} commits {rule.commit.value}, but --speculative {method.name} runs the "
                f"{method.loop} loop: use its own rule {method.default_rule!r} or another {method.loop}-loop rule"
            )
    elif args.speculative_option:
        _fail("--speculative-option needs a --speculative method")
    try:
        from .jobs import parse_key_values

        acceptance_options = parse_key_values(args.acceptance_option, "--acceptance-option")
    except ValueError as err:
        _fail(str(err))
    # Option names are the rule's, known without the model (their values are checked once it loads).
    rule = args.acceptance or (registry.get(args.speculative).default_rule if args.speculative != "none" else None)
    if acceptance_options and rule is not None:
        from ..rules import check_rule_options

        try:
            check_rule_options(rule, acceptance_options)
        except ValueError as err:
            _fail(f"--acceptance-option: {err}")
    _check_greedy_rule(args)
    if args.speculative != "none" and args.num_draft_tokens < 1 and not getattr(args, "eagle_tree", None):
        _fail(
            f"--num-draft-tokens must be >= 1 with --speculative {args.speculative}, got {args.num_draft_tokens} "
            "(use --speculative none for the baseline)"
        )
    for flag in ("labels_file", "prompts_file"):
        value = getattr(args, flag, None)
        if value is not None and not value.is_file():
            _fail(f"--{flag.replace('_', '-')} {value}: no such file")
    if family.check_args is not None:
        family.check_args(args)


def check_caption_settings(args: argparse.Namespace, drafters: list[str]) -> None:
    """``SystemExit`` with a message if ``mmspec caption``'s settings cannot work for any image."""
    from ..rules import ACCEPTANCE_RULES
    from ..types import CommitMode

    _check_common(args)
    _check_sources(args)
    _check_sampling(args, guidance=False)
    if args.max_new_tokens < 1:
        _fail(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.drafter not in drafters:
        _fail(f"--drafter must be one of {sorted(drafters)}, got {args.drafter!r}")
    if args.drafter != "none" and args.num_draft_tokens < 1:
        _fail(
            f"--num-draft-tokens must be >= 1 with a drafter, got {args.num_draft_tokens} (use --drafter none for "
            "the baseline)"
        )
    # Captions come from the causal loop (every VLM method runs it): only prefix-committing rules apply.
    causal = sorted(name for name, rule in ACCEPTANCE_RULES.items() if rule.commit == CommitMode.PREFIX)
    if args.acceptance not in causal:
        _fail(f"--acceptance must be one of {', '.join(causal)} (rules of the causal loop); got {args.acceptance!r}")
    if args.drafter_option:
        from ..pipelines.vlm.pipeline_vlm import VLM_METHODS
        from .jobs import parse_key_values

        if args.drafter not in VLM_METHODS.names():
            _fail(f"--drafter-option needs a --drafter method ({', '.join(VLM_METHODS.names())}), got {args.drafter!r}")
        try:
            VLM_METHODS.get(args.drafter).resolve_options(parse_key_values(args.drafter_option, "--drafter-option"))
        except ValueError as err:
            _fail(str(err))
    _check_greedy_rule(args)
    if args.max_image_side < 1:
        _fail(f"--max-image-side must be >= 1, got {args.max_image_side}")
