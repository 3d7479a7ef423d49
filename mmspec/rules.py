"""Every acceptance rule, by name: importing this module registers the built-in rules (lossless
token rules in :mod:`mmspec.acceptance`, relaxed ones in :mod:`mmspec.relaxed`, elementwise ones in
:mod:`mmspec.elementwise`, block routers in :mod:`mmspec.routers`) in ``ACCEPTANCE_RULES``, and
:func:`get_acceptance_rule` builds one. A rule defined elsewhere registers itself with
:func:`~mmspec.acceptance.register_acceptance_rule` and is found the same way."""

from __future__ import annotations

from collections.abc import Iterable

from . import elementwise, relaxed, routers  # noqa: F401  (each registers its rules on import)
from .acceptance import ACCEPTANCE_RULES, AcceptanceRule

__all__ = ["ACCEPTANCE_RULES", "check_rule_options", "get_acceptance_rule"]


def check_rule_options(rule: str, options: Iterable[str], from_resources: bool = True) -> None:
    """``ValueError`` when ``rule`` is not a registered rule or ``options`` (names) holds one it does
    not take (``from_resources``: as a pipeline builds it, see :meth:`AcceptanceRule.option_names`).
    Needs no model, so commands check ``--acceptance-option`` before loading one."""
    if rule not in ACCEPTANCE_RULES:
        raise ValueError(f"unknown acceptance rule {rule!r}; available: {sorted(ACCEPTANCE_RULES)}")
    known = ACCEPTANCE_RULES[rule].option_names(from_resources)
    unknown = sorted(set(options) - set(known)) if known is not None else []
    if unknown and not known:
        raise ValueError(f"acceptance rule {rule!r} takes no options; got {', '.join(unknown)}")
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for acceptance rule {rule!r}; its options: {', '.join(known)}")


def get_acceptance_rule(rule: str | AcceptanceRule, resources: dict | None = None, **kwargs) -> AcceptanceRule:
    """An instance of the rule called ``rule`` with options ``kwargs`` (or ``rule`` itself if it
    already is one). ``resources``: what a pipeline offers rules that need its models (see
    :meth:`AcceptanceRule.from_resources`); None outside a pipeline."""
    if isinstance(rule, AcceptanceRule):
        if kwargs:
            raise ValueError("pass options either to the rule's constructor or by name, not both")
        return rule
    check_rule_options(rule, kwargs, from_resources=resources is not None)
    cls = ACCEPTANCE_RULES[rule]
    try:
        return cls(**kwargs) if resources is None else cls.from_resources(resources, **kwargs)
    except TypeError as err:  # a value of the wrong type, or a required option left out
        raise ValueError(f"acceptance rule {rule!r}: {err}") from None
