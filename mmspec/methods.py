"""Speculative methods, one registry per pipeline: a method = (name, loop, drafter factory,
default acceptance rule, options). The pipelines dispatch on it; the CLI (``generate``, ``eval``,
``bench``), the demos and the docs list methods from it — no hand-kept lists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

LOOPS = ("causal", "masked", "block")
#: How the rules a loop runs commit (``AcceptanceRule.commit`` values).
LOOP_COMMITS = {"causal": "prefix", "masked": "elementwise", "block": "block"}


@dataclass(frozen=True)
class Method:
    """One speculative method of a pipeline.

    ``build(pipe, options) -> drafter`` makes the drafter for one call (``options``: this method's
    options, defaults filled in). ``loop``: ``"causal"``, ``"masked"`` or ``"block"`` (which
    :mod:`mmspec.loops` function runs it). ``default_rule``: the acceptance rule used when a call
    names none. ``options``: option name -> default. ``requires``: pipeline components that must be
    set (e.g. ``"drafter"``, ``"eagle_head"``). ``lossless``: whether the method with its default rule
    reproduces the target (in distribution; token for token when greedy). ``needs_options``: options
    without a usable default (e.g. a drafter's path): until a call gives them the method is not
    listed by :meth:`MethodRegistry.available` (demos and CLIs build every available method with
    defaults).
    """

    name: str
    loop: str
    build: Callable[[Any, dict], Any]
    default_rule: str = "exact"
    options: Mapping[str, Any] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    lossless: bool = True
    description: str = ""
    needs_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.loop not in LOOPS:
            raise ValueError(f"method {self.name!r}: loop must be one of {LOOPS}, got {self.loop!r}")
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def accepts(self, rule: Any) -> bool:
        """Whether the acceptance rule (class or instance) commits the way this method's loop does."""
        return rule.commit.value == LOOP_COMMITS[self.loop]

    def missing(self, pipe: Any) -> list[str]:
        """The components ``pipe`` lacks for this method."""
        return [name for name in self.requires if getattr(pipe, name, None) is None]

    def resolve_options(self, options: Mapping[str, Any] | None) -> dict:
        """This method's options with defaults filled in; an unknown name is a ValueError."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise ValueError(f"unknown option(s) {unknown} for speculative method {self.name!r}; its options: {known}")
        return {**self.options, **options}


class MethodRegistry:
    """The speculative methods of one pipeline class, by name (``speculative=None`` is the baseline)."""

    def __init__(self, pipeline: str) -> None:
        self.pipeline = pipeline
        self._methods: dict[str, Method] = {}

    def register(
        self,
        name: str,
        *,
        loop: str = "causal",
        default_rule: str = "exact",
        options: Mapping[str, Any] | None = None,
        requires: tuple[str, ...] = (),
        lossless: bool = True,
        description: str = "",
        needs_options: tuple[str, ...] = (),
    ) -> Callable[[Callable[[Any, dict], Any]], Callable[[Any, dict], Any]]:
        """Decorator: register ``build(pipe, options) -> drafter`` as method ``name`` (its docstring is
        the description unless one is given)."""

        def wrap(build: Callable[[Any, dict], Any]) -> Callable[[Any, dict], Any]:
            if name in self._methods:
                raise ValueError(f"{self.pipeline} already has a speculative method {name!r}")
            paragraph = (build.__doc__ or "").strip().split("\n\n")[0]
            text = description or " ".join(paragraph.split())
            self._methods[name] = Method(
                name, loop, build, default_rule, options or {}, tuple(requires), lossless, text, tuple(needs_options)
            )
            return build

        return wrap

    def get(self, name: str) -> Method:
        """The method called ``name``, or a ValueError listing the available ones."""
        if name not in self._methods:
            raise ValueError(f"unknown speculative method {name!r} for {self.pipeline}; available: {self.names()}")
        return self._methods[name]

    def names(self) -> list[str]:
        return sorted(self._methods)

    def available(self, pipe: Any) -> list[str]:
        """Names of the methods ``pipe`` has every required component for and that run with their
        default options (no ``needs_options``)."""
        return [
            name
            for name in self.names()
            if not self._methods[name].missing(pipe) and not self._methods[name].needs_options
        ]

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def __iter__(self) -> Iterator[Method]:
        return iter(self._methods[name] for name in self.names())

    def __len__(self) -> int:
        return len(self._methods)

    def __repr__(self) -> str:
        return f"MethodRegistry({self.pipeline!r}: {', '.join(self.names())})"
