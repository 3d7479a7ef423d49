"""VideoPipeline through the shared pipeline checks (:class:`PipelineTesterMixin`).

Video blocks are continuous latents denoised from drawn noise: there is no vocabulary and no
temperature, and a "greedy" call is a deterministic one (the mixin's fixed-seed generator). Every
speculative method is lossy (SDVG mixes blocks of two models); its lossless configuration is
``tau = +inf`` (every drafted block handed back), which equals target-only bit for bit — that is the
method the mixin's equality checks run.
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

from mmspec.pipelines.video import VideoPipeline

from ...conftest import tiny_video_model, tiny_video_vae
from ..pipeline_mixin import PipelineTesterMixin
from .test_pipeline_video import BrightnessScorer

NUM_FRAMES = 6


@functools.cache
def tiny_pipeline() -> VideoPipeline:
    pipe = VideoPipeline(
        target=tiny_video_model(seed=0),
        vae=tiny_video_vae(),
        drafter=tiny_video_model(seed=1, dim=16, depth=1),
        scorer=BrightnessScorer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class TestVideoPipelineCommon(PipelineTesterMixin):
    pipeline_class = VideoPipeline
    # No token distributions (no temperature / top-k / top-p) and no draft length: a draft is a block.
    common_call_params = PipelineTesterMixin.common_call_params - {"temperature", "top_k", "top_p", "num_draft_tokens"}
    call_params: ClassVar[frozenset[str]] = frozenset(
        {
            "prompt",
            "class_labels",
            "num_frames",
            "num_inference_steps",
            "guidance_scale",
            "output_type",
            "acceptance_options",
            "speculative_options",
        }
    )
    method_param = "speculative"
    greedy_kwargs: ClassVar[dict[str, Any]] = {}
    sampling_kwargs: ClassVar[dict[str, Any]] = {}

    def _run(self, pipe, inputs, method=None, seed=0, **kwargs):
        import torch

        chosen = self.baseline_kwargs() if method is None else dict(method)
        return pipe(**inputs, **chosen, generator=torch.Generator().manual_seed(seed), **kwargs)

    def get_pipeline(self) -> VideoPipeline:
        return tiny_pipeline()

    def get_inputs(self, batch_size: int) -> dict[str, Any]:
        return {
            "class_labels": [(2 * row + 1) % 3 for row in range(batch_size)],
            "num_frames": NUM_FRAMES,
            "num_inference_steps": 2,
            "guidance_scale": 1.5,
            "output_type": "pt",
        }

    def single_row_inputs(self, inputs: dict[str, Any], row: int) -> dict[str, Any]:
        return {**inputs, "class_labels": [inputs["class_labels"][row]]}

    def speculative_methods(self, pipe: VideoPipeline) -> dict[str, Any]:
        """SDVG at tau = +inf (its lossless configuration) when the pipeline has a drafter and a scorer."""
        if "sdvg" in pipe.methods.available(pipe):
            return {"sdvg": {"speculative": "sdvg", "acceptance_options": {"tau": math.inf}}}
        return {}

    def baseline_kwargs(self) -> dict[str, Any]:
        return {"speculative": None}

    def generated_rows(self, output) -> list[list[float]]:
        return output.latents.flatten(1).tolist()

    def save_and_reload(self, pipe: VideoPipeline, directory) -> VideoPipeline:
        """The scorer is not saved (scorers load from their own weights): it is set again after loading."""
        pipe.save_pretrained(directory)
        loaded = VideoPipeline.from_pretrained(directory)
        loaded.set_scorer(pipe.scorer)
        loaded.set_progress_bar_config(disable=True)
        return loaded

    def test_batch_equals_single_rows_when_greedy(self):
        """Overridden: one generator draws every row's block noise at once, so a batch row is not the
        same row run alone. The closest true property: rows are independent — changing row 1's class
        leaves row 0 unchanged, and row 1 does change."""
        pipe = self.get_pipeline()
        inputs = self.get_inputs(batch_size=2)
        other = {**inputs, "class_labels": [inputs["class_labels"][0], 2]}
        for method in [None, *self._methods(pipe).values()]:
            first = self.generated_rows(self._run(pipe, inputs, method))
            second = self.generated_rows(self._run(pipe, other, method))
            assert first[0] == second[0], f"method {method!r}: row 0 depends on row 1"
            assert first[1] != second[1], f"method {method!r}: row 1 ignored its class"
