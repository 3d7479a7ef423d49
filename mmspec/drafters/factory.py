"""Builders shared by the pipelines' method registries (one place that turns a method's options into
a drafter, so every AR image pipeline offers SJD / MC-SJD and adaptive windows the same way)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..methods import MethodRegistry
from .adaptive import POLICIES, AdaptiveWindow
from .eagle import EagleDrafter, EagleHead, TreeConfig
from .jacobi import JacobiDrafter

#: ``window`` option values: a fixed width, or an :class:`AdaptiveWindow` policy.
WINDOWS = ("fixed",) + POLICIES


def with_window(drafter: Any, window: str, memory: dict | None = None) -> Any:
    """``drafter`` itself (``window="fixed"``) or wrapped in an :class:`AdaptiveWindow` with that policy
    (``memory``: a dict that carries what the cost-aware policy learned across calls)."""
    if window == "fixed":
        return drafter
    if window not in POLICIES:
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
    return AdaptiveWindow(drafter, policy=window, memory=memory)


def window_memory(memo: dict, method: str, options: dict) -> dict:
    """The entry of a pipeline's ``memo`` dict for one method and its options (adaptive windows learn per
    configuration and, inside it, per batch size)."""
    return memo.setdefault((method, tuple(sorted((k, repr(v)) for k, v in options.items()))), {})


def jacobi_method(vocab_size: int, grid_width: int, options: dict, memory: dict | None = None) -> Any:
    """The drafter of an SJD / MC-SJD method from its options: ``init`` ("random" or "copy": the token
    one grid row above, ``grid_width`` tokens back), ``coupling`` ("none", "maximal", "gumbel") and
    ``window`` (:data:`WINDOWS`)."""
    init = options["init"]
    drafter = JacobiDrafter(
        vocab_size, init=init, copy_offset=grid_width if init == "copy" else None, coupling=options["coupling"]
    )
    return with_window(drafter, options.get("window", "fixed"), memory)


def register_jacobi_methods(registry: MethodRegistry, row_width: Callable[[Any], int]) -> None:
    """Register ``"sjd"`` and ``"mc-sjd"`` on an AR image pipeline's ``registry``; ``row_width(pipe)``
    is the number of tokens of one image row (SJD's ``init="copy"`` guesses the token above). The
    pipeline provides ``target.vocab_size`` and a ``_window_memo`` dict (adaptive windows' memory)."""

    @registry.register("sjd", options={"init": "random", "coupling": "none", "window": "fixed"})
    def _sjd(pipe: Any, options: dict) -> Any:
        """Speculative Jacobi decoding (training-free; ``init``: fresh guesses "random" or "copy" = the token
        above; ``coupling``: "none", or "maximal" / "gumbel" = MC-SJD; ``window``: "fixed", "heuristic" or
        "cost" (adaptive))."""
        return jacobi_method(
            pipe.target.vocab_size, row_width(pipe), options, window_memory(pipe._window_memo, "sjd", options)
        )

    @registry.register("mc-sjd", options={"init": "random", "coupling": "maximal", "window": "fixed"})
    def _mc_sjd(pipe: Any, options: dict) -> Any:
        """MC-SJD (arXiv 2510.24211): SJD whose redrafts are coupled to the previous iteration's (lossless)."""
        return jacobi_method(
            pipe.target.vocab_size, row_width(pipe), options, window_memory(pipe._window_memo, "mc-sjd", options)
        )


def eagle_method(
    head: EagleHead | None, options: dict, train_command: str, step: Callable | None = None
) -> EagleDrafter:
    """The drafter of a pipeline's ``"eagle"`` method: its EAGLE ``head`` (None: an error saying how to
    attach one, and ``train_command`` to train one) drafting a chain, or an EAGLE-2 dynamic tree
    (``options["tree"]``: a :class:`~mmspec.drafters.eagle.TreeConfig`); ``step``: the head's compiled
    forward when the pipeline compiles (``EagleDrafter(step=...)``), None to run it eagerly."""
    if head is None:
        raise ValueError(
            f"speculative='eagle' needs an EAGLE head: pipe.load_eagle_head(path), or --eagle-head DIR on the command line "
            f"(train one with {train_command})"
        )
    tree = options["tree"]
    if tree is not None and not isinstance(tree, TreeConfig):
        raise ValueError(
            f"the EAGLE option tree must be a TreeConfig(depth, top_k, total_nodes) or None, got {tree!r} "
            "(command line: --eagle-tree DEPTH,TOP_K,NODES)"
        )
    return EagleDrafter(head, tree=tree, step=step)
