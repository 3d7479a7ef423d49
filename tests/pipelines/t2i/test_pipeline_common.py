"""JanusImagePipeline and Emu3ImagePipeline through the shared pipeline checks
(:class:`PipelineTesterMixin`), on the tiny random transformers models of test_janus.py / test_emu3.py.

Neither is a diffusers pipeline: its on-disk form is the transformers checkpoint of its model plus
``model_index.json`` and the EAGLE head's ``eagle/`` folder (``pipe.save_pretrained``), which the
pipeline's ``from_pretrained`` loads. Each tiny pipeline carries an (untrained) EAGLE head, so every
check also runs ``speculative="eagle"`` and the round trip restores the head."""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import pytest
import torch

pytest.importorskip("transformers")

from mmspec.pipelines.t2i import EMU3_METHODS, JANUS_METHODS, Emu3ImagePipeline, JanusImagePipeline  # noqa: E402

from ..pipeline_mixin import PipelineTesterMixin  # noqa: E402
from .test_emu3 import NEGATIVE as EMU3_NEGATIVE  # noqa: E402
from .test_emu3 import WRAP, H, W, tiny_emu3  # noqa: E402
from .test_janus import BOI, BOS, PAD, tiny_janus  # noqa: E402


@functools.cache
def janus_pipeline() -> JanusImagePipeline:
    pipe = JanusImagePipeline(tiny_janus(sharpness=4.0))
    torch.manual_seed(0)
    pipe.attach_eagle_head(pipe.new_eagle_head())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.cache
def emu3_pipeline() -> Emu3ImagePipeline:
    pipe = Emu3ImagePipeline(tiny_emu3(), height=H, width=W)
    torch.manual_seed(0)
    pipe.attach_eagle_head(pipe.new_eagle_head())
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _T2IPipelineCommon(PipelineTesterMixin):
    method_param = "speculative"
    call_params: ClassVar[frozenset[str]] = frozenset(
        {"prompt", "input_ids", "attention_mask", "guidance_scale", "output_type", "speculative_options"}
    )
    num_draft_tokens = 4

    def speculative_methods(self, pipe) -> dict[str, Any]:
        """Every registered lossless method the pipeline can build (SJD, MC-SJD, EAGLE with its head)."""
        return {name: name for name in pipe.methods.available(pipe) if pipe.methods.get(name).lossless}

    def baseline_kwargs(self) -> dict[str, Any]:
        return {"speculative": None}

    def generated_rows(self, output) -> list[list[int]]:
        return output.tokens.flatten(1).tolist()


class TestJanusImagePipelineCommon(_T2IPipelineCommon):
    pipeline_class = JanusImagePipeline

    def get_pipeline(self) -> JanusImagePipeline:
        return janus_pipeline()

    def get_inputs(self, batch_size: int) -> dict[str, Any]:
        # CFG on; the second row is left padded (each row keeps its padding when called alone).
        rows = [[BOS, 5, 7, 9, 11, BOI], [PAD, PAD, BOS, 8, 2, BOI], [PAD, BOS, 3, 3, 8, BOI]]
        ids = torch.tensor(rows[:batch_size])
        return {"input_ids": ids, "attention_mask": (ids != PAD).long(), "guidance_scale": 3.0, "output_type": "pt"}

    def single_row_inputs(self, inputs: dict[str, Any], row: int) -> dict[str, Any]:
        return {
            **inputs,
            "input_ids": inputs["input_ids"][row : row + 1],
            "attention_mask": inputs["attention_mask"][row : row + 1],
        }

    def save_and_reload(self, pipe: JanusImagePipeline, directory) -> JanusImagePipeline:
        pipe.save_pretrained(directory)
        loaded = JanusImagePipeline.from_pretrained(directory)
        loaded.set_progress_bar_config(disable=True)
        return loaded

    def test_every_registered_method_is_exercised(self):
        lossless = [method.name for method in JANUS_METHODS if method.lossless]
        assert sorted(self.speculative_methods(self.get_pipeline())) == sorted(lossless)


class TestEmu3ImagePipelineCommon(_T2IPipelineCommon):
    pipeline_class = Emu3ImagePipeline
    call_params = _T2IPipelineCommon.call_params | {"negative_prompt", "negative_prompt_ids"}

    def get_pipeline(self) -> Emu3ImagePipeline:
        return emu3_pipeline()

    def get_inputs(self, batch_size: int) -> dict[str, Any]:
        # CFG against the negative prompt; the second row is left padded.
        ids = torch.tensor([[1, 5, 7, 9, 32, WRAP], [0, 0, 1, 8, 32, WRAP], [0, 1, 3, 3, 32, WRAP]])[:batch_size]
        return {
            "input_ids": ids,
            "attention_mask": (ids != 0).long(),
            "negative_prompt_ids": EMU3_NEGATIVE[:1].expand(batch_size, -1).clone(),
            "guidance_scale": 3.0,
            "output_type": "pt",
        }

    def single_row_inputs(self, inputs: dict[str, Any], row: int) -> dict[str, Any]:
        picked = ("input_ids", "attention_mask", "negative_prompt_ids")
        return {**inputs, **{key: inputs[key][row : row + 1] for key in picked}}

    def save_and_reload(self, pipe: Emu3ImagePipeline, directory) -> Emu3ImagePipeline:
        pipe.save_pretrained(directory)
        loaded = Emu3ImagePipeline.from_pretrained(directory)  # the grid is recorded in model_index.json
        loaded.set_progress_bar_config(disable=True)
        return loaded

    def test_every_registered_method_is_exercised(self):
        lossless = [method.name for method in EMU3_METHODS if method.lossless]
        assert sorted(self.speculative_methods(self.get_pipeline())) == sorted(lossless)
