"""VLMPipeline through the shared pipeline checks (:class:`PipelineTesterMixin`), on tiny random
LLaVA-1.5 and Qwen2-VL models (M-RoPE)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from mmspec.drafters import ModelDrafter, NGramDrafter
from mmspec.drafters.eagle import TreeConfig
from mmspec.pipelines.vlm import (
    VISUAL_PATHS,
    VLMEagleDrafter,
    VLMEagleHead,
    VLMPipeline,
    load_vlm_target,
)

from ..pipeline_mixin import PipelineTesterMixin
from .test_vlm import image, noisy_decoder, tiny_pipeline, tiny_vlm

TREE = TreeConfig(depth=3, top_k=2, total_nodes=5)


class _VLMPipelineCommon(PipelineTesterMixin):
    pipeline_class = VLMPipeline
    call_params: ClassVar[frozenset[str]] = frozenset({"images", "prompt", "max_new_tokens", "stream"})
    method_param = "drafter"
    greedy_kwargs: ClassVar[dict[str, Any]] = {"temperature": 0.0}
    family: ClassVar[str]

    def get_pipeline(self) -> VLMPipeline:
        return tiny_pipeline(self.family)

    def get_inputs(self, batch_size: int) -> dict[str, Any]:
        questions = ["what is in this picture", "a cat", "describe the image"]
        return {
            "images": [image(3 + row) for row in range(batch_size)],
            "prompt": questions[:batch_size],
            "max_new_tokens": 10,
        }

    def single_row_inputs(self, inputs: dict[str, Any], row: int) -> dict[str, Any]:
        return {**inputs, "images": [inputs["images"][row]], "prompt": [inputs["prompt"][row]]}

    def speculative_methods(self, pipe: VLMPipeline) -> dict[str, Any]:
        """The VLM drafters (each lossless, whatever its weights): n-gram lookup, a draft model (chain and
        tree), and a random EAGLE head for every registered visual path (chains; a tree for "full")."""
        target = pipe.target

        def eagle(path: str, tree: TreeConfig | None = None) -> VLMEagleDrafter:
            torch.manual_seed(0)
            head = VLMEagleHead.for_target(target, path, ratio=4, num_queries=4).eval()
            return VLMEagleDrafter(head, target, tree)

        return {
            "ngram": NGramDrafter(target.vocab_size),
            "model": ModelDrafter(target.with_decoder(noisy_decoder(target.decoder, 0.05))),
            "model-tree": ModelDrafter(target.with_decoder(noisy_decoder(target.decoder, 0.05)), num_alternatives=2),
            **{f"eagle-{path}": eagle(path) for path in sorted(VISUAL_PATHS)},
            "eagle-full-tree": eagle("full", TREE),
        }

    def baseline_kwargs(self) -> dict[str, Any]:
        return {"num_draft_tokens": 0}

    def generated_rows(self, output) -> list[list[int]]:
        return [row[:n] for row, n in zip(output.token_ids.tolist(), output.lengths.tolist())]

    def save_and_reload(self, pipe: VLMPipeline, directory) -> VLMPipeline:
        """A VLM pipeline's on-disk form is its Hugging Face checkpoint (model + processor), which
        ``VLMPipeline.from_pretrained`` loads; the pipeline itself has no ``save_pretrained`` yet."""
        model, processor = tiny_vlm(self.family)
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
        return VLMPipeline.from_pretrained(directory)


class TestLlavaPipelineCommon(_VLMPipelineCommon):
    family = "llava"


class TestQwen2VLPipelineCommon(_VLMPipelineCommon):
    family = "qwen2_vl"

    def save_and_reload(self, pipe: VLMPipeline, directory) -> VLMPipeline:
        """The model round-trips through its checkpoint; the processor is the test's stand-in (the real
        ``Qwen2VLProcessor`` needs torchvision, absent on CPU CI), which cannot be saved."""
        model, processor = tiny_vlm(self.family)
        model.save_pretrained(directory)
        return VLMPipeline(load_vlm_target(directory), processor)
