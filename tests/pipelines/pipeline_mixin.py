"""The checks every mmspec pipeline passes (diffusers' ``PipelineTesterMixin`` pattern, DESIGN.md §6).

A pipeline's test class subclasses :class:`PipelineTesterMixin`, names its expected ``__call__``
arguments as class attributes and implements the hooks that build tiny random components and
read its outputs; the mixin then checks: the call signature, batch vs single rows (greedy),
``return_dict=False``, seed determinism, the ``save_pretrained`` -> ``from_pretrained`` round trip,
and that every speculative method the tiny pipeline can build reproduces the baseline token for
token when greedy.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch


class PipelineTesterMixin(abc.ABC):
    """Shared pipeline tests. Subclasses set the class attributes and implement the hooks below."""

    #: The pipeline class under test.
    pipeline_class: ClassVar[type]
    #: ``__call__`` arguments every mmspec pipeline takes (DESIGN.md §3): seeding, sampling, output
    #: form, draft length and the acceptance rule.
    common_call_params: ClassVar[frozenset[str]] = frozenset(
        {
            "generator",
            "temperature",
            "top_k",
            "top_p",
            "return_dict",
            "num_draft_tokens",
            "acceptance",
            "callback_on_step_end",
        }
    )
    #: This pipeline's further expected arguments (e.g. ``output_type``, ``callback_on_step_end``).
    call_params: ClassVar[frozenset[str]] = frozenset()
    #: The ``__call__`` argument that chooses the speculation method (a name, or a drafter object).
    method_param: ClassVar[str]
    #: Arguments that make a call sample (seed-dependent output).
    sampling_kwargs: ClassVar[dict[str, Any]] = {"temperature": 1.0}
    #: Arguments that make a call greedy.
    greedy_kwargs: ClassVar[dict[str, Any]] = {"temperature": 0}
    #: Drafts per verify step in speculative calls.
    num_draft_tokens: ClassVar[int] = 3

    # ------------------------------------------------------------------ hooks
    @abc.abstractmethod
    def get_pipeline(self) -> Any:
        """A pipeline over tiny random components (cached by the subclass: tests must not change it)."""

    @abc.abstractmethod
    def get_inputs(self, batch_size: int) -> dict[str, Any]:
        """Call arguments for ``batch_size`` different rows (conditioning and length, no sampling settings)."""

    @abc.abstractmethod
    def single_row_inputs(self, inputs: dict[str, Any], row: int) -> dict[str, Any]:
        """The arguments of ``inputs`` for its row ``row`` alone."""

    @abc.abstractmethod
    def speculative_methods(self, pipe: Any) -> dict[str, Any]:
        """name -> the value of :attr:`method_param` for every registered lossless speculative method
        ``pipe`` can build (greedy output must equal the baseline's)."""

    @abc.abstractmethod
    def baseline_kwargs(self) -> dict[str, Any]:
        """Call arguments that run the plain autoregressive baseline."""

    @abc.abstractmethod
    def generated_rows(self, output: Any) -> list[list[int]]:
        """The generated token ids of each row of a ``return_dict=True`` output."""

    @abc.abstractmethod
    def save_and_reload(self, pipe: Any, directory) -> Any:
        """``pipe`` saved to ``directory`` and loaded back with the pipeline's ``from_pretrained``."""

    # ------------------------------------------------------------------ helpers
    def _run(self, pipe: Any, inputs: dict[str, Any], method: Any = None, seed: int = 0, **kwargs) -> Any:
        chosen = (
            self.baseline_kwargs()
            if method is None
            else {self.method_param: method, "num_draft_tokens": self.num_draft_tokens}
        )
        return pipe(**inputs, **chosen, generator=torch.Generator().manual_seed(seed), **kwargs)

    def _methods(self, pipe: Any) -> dict[str, Any]:
        methods = self.speculative_methods(pipe)
        assert methods, "the tiny pipeline builds no speculative method: give it the components they need"
        return methods

    # ------------------------------------------------------------------ tests
    def test_call_signature(self):
        parameters = inspect.signature(self.pipeline_class.__call__).parameters
        expected = self.common_call_params | self.call_params | {self.method_param}
        missing = sorted(expected - set(parameters))
        assert not missing, f"{self.pipeline_class.__name__}.__call__ lacks {missing}"

    def test_batch_equals_single_rows_when_greedy(self):
        pipe = self.get_pipeline()
        inputs = self.get_inputs(batch_size=2)
        for method in [None, *self._methods(pipe).values()]:
            batch = self.generated_rows(self._run(pipe, inputs, method, **self.greedy_kwargs))
            singles = [
                self.generated_rows(self._run(pipe, self.single_row_inputs(inputs, row), method, **self.greedy_kwargs))[
                    0
                ]
                for row in range(2)
            ]
            assert batch == singles, f"method {method!r}: batch rows differ from single-row calls"

    def test_return_dict_false_returns_the_same_content(self):
        pipe = self.get_pipeline()
        inputs = self.get_inputs(batch_size=2)
        output = self._run(pipe, inputs, **self.greedy_kwargs)
        as_tuple = self._run(pipe, inputs, return_dict=False, **self.greedy_kwargs)
        assert isinstance(as_tuple, tuple) and not isinstance(output, tuple)
        fields = [getattr(output, field.name) for field in dataclasses.fields(output)]
        assert len(as_tuple) == len(fields)
        for got, expected in zip(as_tuple, fields):
            assert_same_content(got, expected)

    def test_seed_determinism(self):
        pipe = self.get_pipeline()
        inputs = self.get_inputs(batch_size=2)
        for method in [None, *self._methods(pipe).values()]:
            first = self.generated_rows(self._run(pipe, inputs, method, seed=0, **self.sampling_kwargs))
            again = self.generated_rows(self._run(pipe, inputs, method, seed=0, **self.sampling_kwargs))
            assert first == again, f"method {method!r}: the same seed gave different outputs"
        other = self.generated_rows(self._run(pipe, inputs, seed=1, **self.sampling_kwargs))
        assert other != first, "a different seed gave the same sampled output"

    def test_save_load_round_trip(self, tmp_path):
        pipe = self.get_pipeline()
        loaded = self.save_and_reload(pipe, tmp_path)
        assert type(loaded) is type(pipe)
        inputs = self.get_inputs(batch_size=2)
        methods, reloaded_methods = self._methods(pipe), self.speculative_methods(loaded)
        assert sorted(reloaded_methods) == sorted(methods), "the reloaded pipeline lost components"
        for name in [None, *methods]:
            expected = self._run(pipe, inputs, methods.get(name), **self.greedy_kwargs)
            got = self._run(loaded, inputs, reloaded_methods.get(name), **self.greedy_kwargs)
            assert self.generated_rows(got) == self.generated_rows(expected), f"method {name!r} after reloading"

    def test_callback_on_step_end_runs_once_per_step(self):
        """diffusers' convention: ``callback_on_step_end(pipe, step, timestep, kwargs)`` after every
        verify step, with the pipeline and increasing step indices; the output is unchanged."""
        pipe = self.get_pipeline()
        inputs = self.get_inputs(batch_size=2)
        for method in [None, *self._methods(pipe).values()]:
            calls = []

            def record(p, step, timestep, kwargs, calls=calls):
                assert p is pipe and isinstance(kwargs, dict) and "num_generated" in kwargs
                calls.append(step)

            output = self._run(pipe, inputs, method, callback_on_step_end=record, **self.greedy_kwargs)
            assert calls == list(range(1, len(calls) + 1)) and len(calls) == output.stats.steps, f"method {method!r}"
            plain = self._run(pipe, inputs, method, **self.greedy_kwargs)
            assert self.generated_rows(output) == self.generated_rows(plain), f"method {method!r}"

    def test_speculation_equals_baseline_when_greedy(self):
        pipe = self.get_pipeline()
        inputs = self.get_inputs(batch_size=2)
        baseline = self._run(pipe, inputs, **self.greedy_kwargs)
        for name, method in self._methods(pipe).items():
            output = self._run(pipe, inputs, method, **self.greedy_kwargs)
            assert self.generated_rows(output) == self.generated_rows(baseline), f"method {name!r}"


def assert_same_content(got: Any, expected: Any) -> None:
    """Equal tensors, arrays, images, lists and stats (compared by their steps and per-token sources)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got, expected)
    elif isinstance(expected, np.ndarray):
        assert isinstance(got, np.ndarray) and np.array_equal(got, expected)
    elif isinstance(expected, PIL.Image.Image):
        assert isinstance(got, PIL.Image.Image) and np.array_equal(np.asarray(got), np.asarray(expected))
    elif isinstance(expected, (list, tuple)):
        assert type(got) is type(expected) and len(got) == len(expected)
        for a, b in zip(got, expected):
            assert_same_content(a, b)
    elif hasattr(expected, "steps") and hasattr(expected, "token_source"):  # SpecStats
        assert type(got) is type(expected) and got.steps == expected.steps
        assert torch.equal(got.token_source, expected.token_source)
    else:
        assert got == expected
