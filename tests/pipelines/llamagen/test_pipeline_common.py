"""LlamaGenPipeline through the shared pipeline checks (:class:`PipelineTesterMixin`)."""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import torch

from mmspec.drafters import EagleConfig, EagleHead
from mmspec.drafters.eagle import target_fingerprint
from mmspec.pipelines.llamagen import LLAMAGEN_METHODS, LlamaGenEagleHead, LlamaGenPipeline

from ...conftest import tiny_llamagen
from ..pipeline_mixin import PipelineTesterMixin


@functools.cache
def tiny_pipeline() -> LlamaGenPipeline:
    """Target + VQ, a smaller draft GPT and a random EAGLE head: every prefix-commit method builds."""
    gpt, vq = tiny_llamagen()
    draft, _ = tiny_llamagen(dim=16, n_layer=1, seed=1)
    torch.manual_seed(0)
    config = EagleConfig(
        hidden_size=gpt.config.dim,
        n_head=4,
        vocab_size=gpt.vocab_size,
        target_name=target_fingerprint(gpt.output),
        multiple_of=32,
    )
    eagle = LlamaGenEagleHead.from_head(EagleHead(config).eval())
    return LlamaGenPipeline(target=gpt, vq=vq, drafter=draft, eagle=eagle)


class TestLlamaGenPipelineCommon(PipelineTesterMixin):
    pipeline_class = LlamaGenPipeline
    call_params: ClassVar[frozenset[str]] = frozenset(
        {"class_labels", "guidance_scale", "output_type", "acceptance_options", "speculative_options"}
    )
    method_param = "speculative"

    def get_pipeline(self) -> LlamaGenPipeline:
        return tiny_pipeline()

    def get_inputs(self, batch_size: int) -> dict[str, Any]:
        # CFG on: the [cond ; uncond] pair doubles the rows every method must keep in step.
        return {
            "class_labels": [(2 * row + 1) % 5 for row in range(batch_size)],
            "guidance_scale": 2.0,
            "output_type": "pt",
        }

    def single_row_inputs(self, inputs: dict[str, Any], row: int) -> dict[str, Any]:
        return {**inputs, "class_labels": [inputs["class_labels"][row]]}

    def speculative_methods(self, pipe: LlamaGenPipeline) -> dict[str, Any]:
        """Every registered lossless method the pipeline has the components for; MuLo-SD (relaxed,
        local repair) has its own tests in test_mulo.py."""
        return {name: name for name in pipe.methods.available(pipe) if pipe.methods.get(name).lossless}

    def baseline_kwargs(self) -> dict[str, Any]:
        return {"speculative": None}

    def generated_rows(self, output) -> list[list[int]]:
        return output.tokens.flatten(1).tolist()

    def save_and_reload(self, pipe: LlamaGenPipeline, directory) -> LlamaGenPipeline:
        pipe.save_pretrained(directory)
        return LlamaGenPipeline.from_pretrained(directory)

    def test_every_registered_method_is_exercised(self):
        lossless = [method.name for method in LLAMAGEN_METHODS if method.lossless]
        assert sorted(self.speculative_methods(self.get_pipeline())) == sorted(lossless)
