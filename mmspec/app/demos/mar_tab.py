"""The MAR tab of the image demo: the MAR baseline and CSpD (continuous speculative decoding) on the
same class and seed, side by side, with target forwards, acceptance rate, wall times and the
acceptance heat-map.

Thin by design: every number comes from ``MARPipeline.__call__`` and its stats. Named endpoint
``/generate_mar``.
"""

from __future__ import annotations

import tempfile
from typing import Any

import gradio as gr
import PIL.Image
import torch

from mmspec.app.visualize import acceptance_heatmap

from .serving import MAX_SEED, PICTURE_SIZE, parse_class_label, pipeline_errors, save_png

#: CSpD's acceptance rules offered in the MAR tab: the exact density-ratio test and the reference
#: code's tempered test (lossy; its documented distribution shift).
MAR_RULES = ("gaussian-exact", "gaussian-tempered")


def add_mar_tab(pipe: Any, class_names: list[str] | None = None, warmup: bool = True) -> None:
    """Add the MAR tab to the ``gr.Blocks`` being built: baseline vs CSpD (:class:`~mmspec.pipelines.mar.MARPipeline` with a drafter)
    on the same seed, with target forwards, acceptance rate, wall times and the heat-map of which
    tokens were accepted drafts (green), target resamples (red) or pre-filled by the target.

    Named endpoint ``/generate_mar``: ``(class_label, seed, num_iter, gamma, acceptance,
    guidance_scale, temperature)`` -> ``(baseline image, CSpD image, heat-map, summary markdown,
    stats JSON)``. The two pictures differ even for the exact rule: it is lossless in distribution,
    and the baseline commits each token's mean as the official MAR does.
    """
    pipe.set_progress_bar_config(disable=True)
    num_classes = pipe.target.config.class_num
    if warmup:
        for method in (None, "cspd"):
            pipe(
                class_labels=[0], num_iter=4, speculative=method, generator=torch.Generator(pipe.device).manual_seed(0)
            )
    classes = [(f"{i}: {class_names[i]}" if class_names else str(i), i) for i in range(num_classes)]
    side = pipe.target.seq_h

    def generate(class_label, seed, num_iter, gamma, acceptance, guidance_scale, temperature):
        """Baseline then CSpD on the same seed and generation order; see build_mar_demo."""
        if seed is None:
            raise gr.Error("Enter a seed (an integer).")
        label = parse_class_label(class_label, num_classes)
        common = dict(
            class_labels=[label], num_iter=int(num_iter), guidance_scale=guidance_scale, temperature=temperature
        )
        with tempfile.TemporaryDirectory() as scratch:

            def png(image: PIL.Image.Image, name: str) -> str:
                return save_png(scratch, image, name)  # pictures go out as files (see save_png)

            outs = {}
            for name, extra in (
                ("baseline", {}),
                ("cspd", {"speculative": "cspd", "num_draft_tokens": int(gamma), "acceptance": acceptance}),
            ):
                with pipeline_errors():
                    outs[name] = pipe(**common, **extra, generator=torch.Generator(pipe.device).manual_seed(int(seed)))
            base, spec = outs["baseline"].stats, outs["cspd"].stats
            record = {
                "seed": int(seed),
                "acceptance": acceptance,
                "gamma": int(gamma),
                "baseline_target_forwards": base.steps,
                "cspd_target_forwards": spec.steps,  # the pre-filled steps included
                "cspd_draft_forwards": spec.draft_steps,
                "acceptance_rate": spec.draft_acceptance_rate,
                "baseline_seconds": base.total_time,
                "cspd_seconds": spec.total_time,
                "speedup_wall_time": base.total_time / max(spec.total_time, 1e-9),
            }
            heatmap = acceptance_heatmap(
                spec.token_source[0].reshape(side, side),
                spec.token_step[0].reshape(side, side),
                cell=max(PICTURE_SIZE // side, 1),
            )
            rate = record["acceptance_rate"]
            summary = "\n".join(
                [
                    "| run | target forwards | wall time |",
                    "|---|---:|---:|",
                    f"| baseline | {record['baseline_target_forwards']} | {base.total_time:.3f} s |",
                    f"| CSpD γ={int(gamma)} ({acceptance}) | {record['cspd_target_forwards']} | {spec.total_time:.3f} s |",
                    f"\n**Acceptance rate {0.0 if rate is None else rate:.2f}; "
                    f"speed-up {record['speedup_wall_time']:.2f}× wall time.**",
                ]
            )
            yield (
                png(outs["baseline"].images[0], "baseline"),
                png(outs["cspd"].images[0], "cspd"),
                png(heatmap, "heatmap"),
                summary,
                record,
            )

    with gr.Tab("MAR (CSpD)"):
        gr.Markdown(
            "# MAR: continuous speculative decoding (CSpD)\n"
            "A small draft MAR proposes the next γ steps' tokens with their Gaussians; the target checks "
            "them all in one forward (`gaussian-exact`: accept with min(1, p/q), else resample from the "
            "residual — lossless in distribution, so the pictures differ draw for draw). "
            "`gaussian-tempered` is the reference code's lossy test. With a large γ the target predicts "
            "many tokens from older context, like MAR with fewer steps."
        )
        with gr.Row():
            with gr.Column(scale=1):
                class_label = gr.Dropdown(classes, value=classes[0][1], label="Class", allow_custom_value=True)
                seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                num_iter = gr.Slider(1, pipe.target.seq_len, value=16, step=1, label="AR steps (num_iter)")
                gamma = gr.Slider(1, 16, value=4, step=1, label="γ: draft steps per verification")
                acceptance = gr.Dropdown(list(MAR_RULES), value=MAR_RULES[0], label="Acceptance rule")
                guidance_scale = gr.Slider(1.0, 10.0, value=3.0, step=0.5, label="Guidance scale (CFG)")
                temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Temperature")
                run = gr.Button("Generate", variant="primary", elem_id="generate-mar-button")
            with gr.Column(scale=2):
                with gr.Row():
                    outputs = [
                        gr.Image(label=label, height=PICTURE_SIZE, elem_id=elem_id, elem_classes="mmspec-pixels")
                        for label, elem_id in (
                            ("Baseline", "mar-baseline-image"),
                            ("CSpD", "mar-cspd-image"),
                            ("Acceptance heat-map", "mar-heatmap-image"),
                        )
                    ]
                summary = gr.Markdown(elem_id="mar-summary")
                with gr.Accordion("Stats (JSON)", open=False):
                    record = gr.JSON(label="Stats")
        run.click(
            generate,
            [class_label, seed, num_iter, gamma, acceptance, guidance_scale, temperature],
            [*outputs, summary, record],
            api_name="generate_mar",
        )
