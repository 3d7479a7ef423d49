"""``mmspec bench --suite video``: the video pipeline's target-only baseline, draft-only and SDVG at
one or more thresholds τ, same class labels and seed (speed; quality is ``mmspec eval --model video``).

Options (``--option KEY=VALUE``): ``model`` (a VideoPipeline folder; default the embedded pair),
``taus`` (comma-separated, e.g. ``-3.5,-3.0,inf``; default: the folder's calibrated τ), ``scorer``,
``num_inference_steps`` (the target's), ``draft_steps`` (the drafter's), ``guidance_scale``; all
but τ default to the folder's ``sdvg.json`` (:class:`~.models.VideoDefaults`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..loops import GenerationOutput
from ..pipelines.validation import check_int
from .bench import BenchCase, BenchSuite, register_suite, require_folder


@register_suite("video")
def video_suite(
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 1,
    *,
    model: str = "embedded",
    taus: str = "calibrated",
    scorer: str | None = None,
    num_inference_steps: int | None = None,
    draft_steps: int | None = None,
    guidance_scale: float | None = None,
) -> BenchSuite:
    """Block-AR video: target-only, draft-only and SDVG (per tau), with the frame scorer's cost included."""
    from ..pipelines.video.scorers import FRAME_SCORERS
    from .models import VideoDefaults, build_scorer, calibrated_tau, load_video

    # Settings wrong for any model fail before one loads (None: the folder's sdvg.json default).
    for name, value in (("num_inference_steps", num_inference_steps), ("draft_steps", draft_steps)):
        if value is not None:
            check_int(name, value, 1)
    if scorer is not None and scorer not in FRAME_SCORERS:
        raise ValueError(f"scorer must be one of {', '.join(sorted(FRAME_SCORERS))}, got {scorer!r}")
    if taus != "calibrated":
        message = f"taus must be numbers (inf allowed) or 'calibrated', got {taus!r}"
        try:
            values = [float(t) for t in taus.split(",")]
        except ValueError:
            raise ValueError(message) from None
        if any(math.isnan(t) for t in values):
            raise ValueError(message)
    pipe = load_video(None if model == "embedded" else require_folder("model", model), device, dtype)
    pipe.set_progress_bar_config(disable=True)
    defaults = VideoDefaults.of(Path(pipe.name_or_path))
    scorer = scorer or defaults.scorer
    num_inference_steps = num_inference_steps or defaults.num_inference_steps
    draft_steps = draft_steps or defaults.draft_steps
    guidance_scale = defaults.guidance_scale if guidance_scale is None else guidance_scale
    drafting = {"speculative_options": {"draft_steps": draft_steps}} if draft_steps is not None else {}
    if taus == "calibrated":
        tau = calibrated_tau(Path(pipe.name_or_path), scorer, "min")
        if tau is None:
            raise ValueError(f"{pipe.name_or_path} has no sdvg.json calibrated for scorer {scorer!r}: pass taus=...")
        values = [tau]
    pipe.set_scorer(build_scorer(scorer, {}, device, None if model == "embedded" else Path(model)))
    labels = [i % pipe.target.config.num_classes for i in range(batch_size)]

    def case(name: str, **extra) -> BenchCase:
        def run(generator: torch.Generator, profile: bool, part: int) -> GenerationOutput:
            # the whole input is one call: the suite has one part, ``part`` is 0
            # `profile` changes nothing here: the block loop times its phases on every run (a block is
            # long enough to time without device syncs), so every record has the breakdown.
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

    cases = [case("target-only", speculative=None), case("draft-only", speculative="draft-only", **drafting)]
    cases += [
        case(f"sdvg tau={t:g} ({scorer})", speculative="sdvg", acceptance_options={"tau": t}, **drafting)
        for t in values
    ]
    return BenchSuite(
        "video",
        "block-autoregressive video: target-only vs draft-only vs SDVG (lossy; tau=inf equals target-only)",
        cases,
        {
            "model": str(pipe.name_or_path),
            "scorer": scorer,
            "class_labels": labels,
            "num_inference_steps": num_inference_steps,
            "draft_steps": draft_steps,
            "guidance_scale": guidance_scale,
            "frames": pipe.target.config.max_frames,
        },
    )
