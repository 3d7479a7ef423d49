"""``mmspec bench --suite video``: the video pipeline's target-only baseline, draft-only and SDVG at
one or more thresholds τ, same class labels and seed (speed; quality is ``mmspec eval --model video``).

Options (``--option KEY=VALUE``): ``model`` (a VideoPipeline folder; default the embedded pair),
``taus`` (comma-separated, e.g. ``-3.5,-3.0,inf``; default: the folder's calibrated τ), ``scorer``
(default ``vlm``, the embedded captioner), ``num_inference_steps``, ``guidance_scale``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..loops import GenerationOutput
from .bench import BenchCase, BenchSuite, register_suite


@register_suite("video")
def video_suite(
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 1,
    *,
    model: str = "embedded",
    taus: str = "calibrated",
    scorer: str = "vlm",
    num_inference_steps: int = 4,
    guidance_scale: float = 1.0,
) -> BenchSuite:
    """Block-AR video: target-only, draft-only and SDVG (per tau), with the frame scorer's cost included."""
    from .models import build_scorer, calibrated_tau, load_video

    pipe = load_video(None if model == "embedded" else Path(model), device, dtype)
    pipe.set_progress_bar_config(disable=True)
    if taus == "calibrated":
        tau = calibrated_tau(Path(pipe.name_or_path), scorer, "min")
        if tau is None:
            raise ValueError(f"{pipe.name_or_path} has no sdvg.json calibrated for scorer {scorer!r}: pass taus=...")
        values = [tau]
    else:
        values = [float(t) for t in str(taus).split(",")]
        if any(math.isnan(t) for t in values):
            raise ValueError(f"taus must be numbers (inf allowed), got {taus!r}")
    pipe.set_scorer(build_scorer(scorer, {}, device))
    labels = [i % pipe.target.config.num_classes for i in range(batch_size)]

    def case(name: str, **extra) -> BenchCase:
        def run(generator: torch.Generator, profile: bool) -> GenerationOutput:
            out = pipe(
                class_labels=labels,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generator,
                output_type="pt",
                **extra,
            )
            frames = out.latents.shape[1]
            # one "token" per latent frame ([B, F, C*h*w]): the bench compares rows[:length] and counts frames
            return GenerationOutput(
                tokens=out.latents.flatten(2), lengths=torch.full((batch_size,), frames), stats=out.stats
            )

        return BenchCase(name, run, {k: v for k, v in extra.items() if v is not None})

    cases = [case("target-only", speculative=None), case("draft-only", speculative="draft-only")]
    cases += [case(f"sdvg tau={t:g} ({scorer})", speculative="sdvg", acceptance_options={"tau": t}) for t in values]
    return BenchSuite(
        "video",
        "block-autoregressive video: target-only vs draft-only vs SDVG (lossy; tau=inf equals target-only)",
        cases,
        {
            "model": str(pipe.name_or_path),
            "scorer": scorer,
            "class_labels": labels,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "frames": pipe.target.config.max_frames,
        },
    )
