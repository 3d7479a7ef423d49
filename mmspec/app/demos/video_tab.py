"""The video tab of the image demo: target-only and SDVG on the same class and seed, side by side,
each as an animated GIF and a frame strip whose blocks are coloured by who generated them (target
forced, draft kept, draft rejected → target), with wall times, target forwards and speed-up.

Thin by design: every number comes from ``VideoPipeline.__call__`` and its ``BlockStats``.
Named endpoint ``/generate_video``.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

import gradio as gr
import torch

from mmspec.routers import AGGREGATES

from ..models import VideoDefaults
from ..video_io import frame_strip, save_video
from .serving import MAX_SEED, parse_class_label, pipeline_errors

SCALE = 4  # frames are tiny (32 px): shown 4x, nearest neighbour


def add_video_tab(pipe: Any, tau: float, defaults: VideoDefaults | None = None, warmup: bool = True) -> None:
    """Add the video tab to the ``gr.Blocks`` being built. ``pipe``: a :class:`VideoPipeline` with
    a drafter and a scorer; ``tau``: the threshold the slider starts at (e.g. the calibrated one);
    ``defaults``: the step counts the sliders start at and the guidance scale of every call (the
    model folder's :class:`VideoDefaults`).

    Endpoint ``/generate_video``: ``(class_label, seed, tau, aggregate, num_inference_steps,
    draft_steps)`` -> ``(target-only GIF, SDVG GIF, target-only strip, SDVG strip, summary markdown,
    stats JSON)``.
    """
    defaults = defaults or VideoDefaults()
    pipe.set_progress_bar_config(disable=True)
    names = pipe.class_names
    if warmup:  # first calls pay allocations; paid here, they stay out of the compared wall times
        pipe(
            class_labels=[0],
            guidance_scale=defaults.guidance_scale,
            speculative="sdvg",
            acceptance_options={"tau": tau},
        )
    fpb = pipe.target.config.frames_per_block

    def generate_video(class_label, seed, threshold, aggregate, steps, draft_steps):
        if seed is None:
            raise gr.Error("Enter a seed (an integer).")
        label = parse_class_label(class_label, len(names))
        runs = [
            ("target-only", {"speculative": None}),
            (
                "sdvg",
                {
                    "speculative": "sdvg",
                    "acceptance_options": {"tau": float(threshold), "aggregate": aggregate},
                    "speculative_options": {"draft_steps": int(draft_steps)},
                },
            ),
        ]
        outputs, rows = [], []
        with tempfile.TemporaryDirectory() as scratch, pipeline_errors():
            for name, extra in runs:
                out = pipe(
                    class_labels=[label],
                    num_inference_steps=int(steps),
                    guidance_scale=defaults.guidance_scale,
                    generator=torch.Generator().manual_seed(int(seed)),
                    output_type="pt",
                    **extra,
                )
                gif = save_video(out.frames[0], os.path.join(scratch, f"{name}.gif"), scale=SCALE).path
                strip = os.path.join(scratch, f"{name}_strip.png")
                frame_strip(
                    out.frames[0],
                    fpb,
                    scores=out.stats.scores[0],
                    sources=out.stats.token_source[0],
                    tau=float(threshold) if name == "sdvg" else None,
                    scale=SCALE,
                ).save(strip)
                outputs += [str(gif), strip]
                rows.append((name, out.stats))
            (_, base), (_, spec) = rows
            record = {
                "class": names[label],
                "seed": int(seed),
                "tau": float(threshold),
                "aggregate": aggregate,
                "num_inference_steps": int(steps),
                "draft_steps": int(draft_steps),
                "guidance_scale": defaults.guidance_scale,
                "speedup_wall_time": base.total_time / spec.total_time,
                "runs": {name: stats.summary() for name, stats in rows},
            }
            lines = ["| run | wall s | target forwards | draft forwards | blocks kept |", "|---|---|---|---|---|"]
            for name, stats in rows:
                kept = int((stats.token_source == 1).sum())
                lines.append(
                    f"| {name} | {stats.total_time:.3f} | {stats.target_forwards} | {stats.draft_forwards} | {kept} |"
                )
            lines.append(f"\nSpeed-up (wall time, this run): **{record['speedup_wall_time']:.2f}×**")
            # yielded inside the scratch folder: Gradio copies the files before this generator resumes
            target_gif, target_strip, sdvg_gif, sdvg_strip = outputs
            yield target_gif, sdvg_gif, target_strip, sdvg_strip, "\n".join(lines), record

    with gr.Tab("Video (SDVG)"):
        gr.Markdown(
            "# Speculative video blocks (SDVG)\n"
            "Target-only and SDVG with the same class and seed. SDVG lets the small draft model propose each "
            "block of frames; the block is kept when its frames' score (worst frame by default) reaches τ, "
            "otherwise the target regenerates it. The first block is always the target's. Strip colours: "
            "target (forced), draft kept, draft rejected → target. τ = +∞ gives exactly the target-only "
            "video; lower τ keeps more drafts (faster, lossy)."
        )
        with gr.Row():
            with gr.Column(scale=1):
                label = gr.Dropdown([(n, i) for i, n in enumerate(names)], value=0, label="Class")
                seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                threshold = gr.Number(value=tau if math.isfinite(tau) else 0.0, label="τ (router threshold)")
                aggregate = gr.Dropdown(list(AGGREGATES), value="min", label="Aggregate over frames")
                steps = gr.Slider(
                    1, 16, value=defaults.num_inference_steps, step=1, label="Target denoising steps per block"
                )
                draft_steps = gr.Slider(
                    1,
                    16,
                    value=defaults.draft_steps or defaults.num_inference_steps,
                    step=1,
                    label="Draft denoising steps per block",
                )
                run = gr.Button("Generate video", variant="primary", elem_id="generate-video-button")
            with gr.Column(scale=2):
                with gr.Row():
                    target_gif = gr.Image(label="Target only", elem_id="target-video")
                    sdvg_gif = gr.Image(label="SDVG", elem_id="sdvg-video")
                with gr.Row():
                    target_strip = gr.Image(label="Target-only blocks", elem_id="target-strip")
                    sdvg_strip = gr.Image(label="SDVG blocks (coloured by source)", elem_id="sdvg-strip")
                summary = gr.Markdown(elem_id="video-summary")
                with gr.Accordion("Stats (JSON)", open=False):
                    record = gr.JSON(label="Stats")
        run.click(
            generate_video,
            [label, seed, threshold, aggregate, steps, draft_steps],
            [target_gif, sdvg_gif, target_strip, sdvg_strip, summary, record],
            api_name="generate_video",
        )
