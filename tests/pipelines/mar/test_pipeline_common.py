"""MARPipeline through the shared pipeline checks (:class:`PipelineTesterMixin`).

MAR has no greedy (temperature-0) mode: every AR step draws the diffusion head's noises from the
generator, and CSpD is lossless only in the sense of DESIGN.md ("MAR and CSpD on the masked loop"):
with draft = target, ``num_draft_tokens=1`` and the baseline's ``sample_last_step=True`` it equals the
baseline bit for bit under the same generator. So here a "greedy" call is a deterministic one — explicit
per-row generation ``orders`` and the mixin's fixed-seed generator —, the baseline samples its last
reverse step (the tokens CSpD commits), and the only speculative method is CSpD with the target as its
own draft. Checks that cannot hold for MAR are overridden below with the closest true property.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import torch

from mmspec.pipelines.mar import MAR_METHODS, MARPipeline

from ...conftest import tiny_mar, tiny_mar_vae
from ..pipeline_mixin import PipelineTesterMixin

SEQ_LEN = 16  # tiny_mar: a 4x4 token grid
NUM_ITER = 4


@functools.cache
def tiny_pipeline() -> MARPipeline:
    """Target + VAE, with the target as its own CSpD draft (the lossless configuration)."""
    target = tiny_mar(seed=0)
    pipe = MARPipeline(target=target, vae=tiny_mar_vae(), drafter=target)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class TestMARPipelineCommon(PipelineTesterMixin):
    pipeline_class = MARPipeline
    # MAR's tokens are continuous (a diffusion head per token): there is no vocabulary to truncate, so
    # its __call__ has no top_k / top_p.
    common_call_params = PipelineTesterMixin.common_call_params - {"top_k", "top_p"}
    call_params: ClassVar[frozenset[str]] = frozenset(
        {
            "class_labels",
            "num_iter",
            "guidance_scale",
            "orders",
            "sample_last_step",
            "output_type",
            "acceptance_options",
            "speculative_options",
        }
    )
    method_param = "speculative"
    # No temperature-0 mode: temperature scales the reverse steps' std; determinism comes from the
    # explicit orders and the fixed-seed generator every mixin call gets.
    greedy_kwargs: ClassVar[dict[str, Any]] = {"temperature": 1.0}
    sampling_kwargs: ClassVar[dict[str, Any]] = {"temperature": 1.0}
    num_draft_tokens = 1  # CSpD equals the baseline only with gamma = 1 (and draft = target)

    def get_pipeline(self) -> MARPipeline:
        return tiny_pipeline()

    def get_inputs(self, batch_size: int) -> dict[str, Any]:
        # CFG on (the [cond ; null] pair) and a different explicit order per row.
        orders = torch.stack(
            [torch.randperm(SEQ_LEN, generator=torch.Generator().manual_seed(10 + row)) for row in range(batch_size)]
        )
        return {
            "class_labels": [(2 * row + 1) % 5 for row in range(batch_size)],
            "num_iter": NUM_ITER,
            "guidance_scale": 2.5,
            "orders": orders,
            "output_type": "pt",
        }

    def single_row_inputs(self, inputs: dict[str, Any], row: int) -> dict[str, Any]:
        return {**inputs, "class_labels": [inputs["class_labels"][row]], "orders": inputs["orders"][row : row + 1]}

    def speculative_methods(self, pipe: MARPipeline) -> dict[str, Any]:
        """CSpD, when the pipeline's draft MAR has the target's weights: the one configuration in which
        it is lossless bit for bit (DESIGN.md); with a smaller draft it is lossless only in distribution."""
        available = pipe.methods.available(pipe)
        if "cspd" in available and _same_weights(pipe.drafter, pipe.target):
            return {"cspd": "cspd"}
        return {}

    def baseline_kwargs(self) -> dict[str, Any]:
        # The last reverse step sampled (not its mean): the tokens CSpD commits.
        return {"speculative": None, "sample_last_step": True}

    def generated_rows(self, output) -> list[list[float]]:
        return output.latents.flatten(1).tolist()

    def save_and_reload(self, pipe: MARPipeline, directory) -> MARPipeline:
        pipe.save_pretrained(directory)
        loaded = MARPipeline.from_pretrained(directory)
        loaded.set_progress_bar_config(disable=True)
        return loaded

    def test_every_registered_method_is_exercised(self):
        assert sorted(self.speculative_methods(self.get_pipeline())) == sorted(m.name for m in MAR_METHODS)

    def test_batch_equals_single_rows_when_greedy(self):
        """Overridden: MAR draws each AR step's head noises for all rows at once from one generator, so
        a row's noises depend on the batch it is in and batch rows cannot equal single-row calls. The
        closest true property: rows are independent — changing row 1's class label and order leaves row
        0 unchanged (the noise draws keep their shapes), and row 1 does change."""
        pipe = self.get_pipeline()
        inputs = self.get_inputs(batch_size=2)
        other = {
            **inputs,
            "class_labels": [inputs["class_labels"][0], 4],
            "orders": torch.stack([inputs["orders"][0], inputs["orders"][1].flip(0)]),
        }
        for method in [None, *self._methods(pipe).values()]:
            first = self.generated_rows(self._run(pipe, inputs, method, **self.greedy_kwargs))
            second = self.generated_rows(self._run(pipe, other, method, **self.greedy_kwargs))
            assert first[0] == second[0], f"method {method!r}: row 0 depends on row 1"
            assert first[1] != second[1], f"method {method!r}: row 1 ignored its label and order"

    def test_callback_on_step_end_runs_once_per_step(self):
        """Overridden: MAR's callback follows its own documented form, ``f(pipe, step, None, {"tokens":
        [B, L, C], "known": [B, L]})`` — the baseline after every AR step with the 0-based step index
        (diffusers' ``i``), CSpD after every verify round with the target forwards so far — not the
        causal loop's ``num_generated`` with steps 1..n. Checked: once per AR step / verify round, the
        known positions only grow and end full, and the output is unchanged."""
        pipe = self.get_pipeline()
        inputs = self.get_inputs(batch_size=2)
        for method in [None, *self._methods(pipe).values()]:
            calls, known = [], []

            def record(p, step, timestep, kwargs, calls=calls, known=known):
                assert p is pipe and timestep is None and {"tokens", "known"} <= set(kwargs)
                calls.append(step)
                known.append(int(kwargs["known"].sum()))

            output = self._run(pipe, inputs, method, callback_on_step_end=record, **self.greedy_kwargs)
            if method is None:
                assert calls == list(range(NUM_ITER)) and output.stats.steps == NUM_ITER
            else:
                assert calls and calls == sorted(set(calls)) and calls[-1] == output.stats.steps, calls
            assert known == sorted(known) and known[-1] == 2 * SEQ_LEN, f"method {method!r}: {known}"
            plain = self._run(pipe, inputs, method, **self.greedy_kwargs)
            assert self.generated_rows(output) == self.generated_rows(plain), f"method {method!r}"
