"""Every acceptance rule, by name: importing this module registers the built-in rules (lossless
token rules in :mod:`mmspec.acceptance`, relaxed ones in :mod:`mmspec.relaxed`, elementwise ones in
:mod:`mmspec.elementwise`, block routers in :mod:`mmspec.routers`) in ``ACCEPTANCE_RULES``, and
:func:`get_acceptance_rule` builds one. A rule defined elsewhere registers itself with
:func:`~mmspec.acceptance.register_acceptance_rule` and is found the same way."""

from __future__ import annotations

from . import elementwise, relaxed, routers  # noqa: F401  (each registers its rules on import)
from .acceptance import ACCEPTANCE_RULES, AcceptanceRule

__all__ = ["ACCEPTANCE_RULES", "get_acceptance_rule"]


def get_acceptance_rule(rule: str | AcceptanceRule, resources: dict | None = None, **kwargs) -> AcceptanceRule:
    """An instance of the rule called ``rule`` with options ``kwargs`` (or ``rule`` itself if it
    already is one). ``resources``: what a pipeline offers rules that need its models (see
    :meth:`AcceptanceRule.from_resources`); None outside a pipeline."""
    if isinstance(rule, AcceptanceRule):
        if kwargs:
            raise ValueError("pass options either to the rule's constructor or by name, not both")
        return rule
    if rule not in ACCEPTANCE_RULES:
        raise ValueError(f"unknown acceptance rule {rule!r}; available: {sorted(ACCEPTANCE_RULES)}")
    cls = ACCEPTANCE_RULES[rule]
    try:
        return cls(**kwargs) if resources is None else cls.from_resources(resources, **kwargs)
    except TypeError as err:  # an option the rule does not have, or a value of the wrong type
        import inspect

        names = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
        raise ValueError(f"acceptance rule {rule!r}: {err}; its options: {', '.join(names) or 'none'}") from None
