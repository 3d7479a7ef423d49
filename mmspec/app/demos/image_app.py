"""Gradio app: class-conditional image generation, the plain baseline and a speculative method side
by side with the same seed (identical pictures only under greedy decoding: sampling rules are
lossless in distribution), with wall time, steps, speed-up and the acceptance heat-map.

Thin by design: every number shown comes from ``LlamaGenPipeline.__call__`` and its ``SpecStats``;
this module only runs the two calls, streams progress and lays out the results.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import gradio as gr
import numpy as np
import PIL.Image
import torch

from mmspec.app.visualize import acceptance_heatmap
from mmspec.pipelines.llamagen import LlamaGenPipeline
from mmspec.rules import ACCEPTANCE_RULES

from .serving import MAX_SEED, PICTURE_SIZE, parse_class_label, pipeline_errors, save_png

BASELINE = "none"
SLOTS = ("baseline", "method")  # file names of the two runs' pictures
MAX_DRAFT_TOKENS = 64
#: Streamed previews are throttled: each is a picture sent to the page (and a VQ decode when the
#: pipeline's callback passes the tokens).
PREVIEW_INTERVAL_S = 0.25
PENDING_GREY = 128
#: The acceptance choice that means "the method's own rule" (exact for SJD/EAGLE/draft model, mulo for MuLo-SD).
DEFAULT_RULE = "default"


def runnable_methods(pipe: LlamaGenPipeline) -> list[str]:
    """The pipeline's registered speculative methods (``pipe.methods``) whose components it has
    (e.g. ``"draft-model"`` needs a ``drafter``, ``"mulo"`` a ``low_res_drafter``)."""
    return pipe.methods.available(pipe)


def buildable_rules(pipe: LlamaGenPipeline) -> list[str]:
    """``"default"`` (each method's own rule) then the names in ``ACCEPTANCE_RULES`` that this
    pipeline builds from their name alone (relaxed rules get their codebook tables from the
    pipeline: ``pipe.acceptance_rule``; rules needing settings, such as a router's threshold, are
    left out). A rule that does not fit a method's loop is refused by the pipeline with a message."""
    rules = [DEFAULT_RULE]
    for name in sorted(ACCEPTANCE_RULES):
        try:
            pipe.acceptance_rule(name)
        except (ValueError, TypeError):
            continue
        rules.append(name)
    return rules


def class_choices(pipe: LlamaGenPipeline, class_names: list[str] | None) -> list[tuple[str, int]]:
    """``(label shown, class id)`` pairs: ``"3: cat"`` with class names (index = class id), else the bare ids."""
    ids = range(pipe.target.config.num_classes)
    return [(f"{i}: {class_names[i]}" if class_names else str(i), i) for i in ids]


def preview_image(pipe: LlamaGenPipeline, num_generated: int, tokens: torch.Tensor) -> PIL.Image.Image:
    """A picture of a generation in progress: ``tokens`` (``[h * w]`` ids in raster order, valid
    below ``num_generated``) decoded, with the not-yet-generated patches painted grey."""
    grid = pipe.target.grid_size
    done = (torch.arange(grid * grid) < num_generated).reshape(grid, grid)
    codes = torch.where(done.flatten(), tokens.flatten().cpu(), 0).reshape(1, grid, grid)
    with torch.no_grad():
        decoded = pipe.vq.decode_code(codes.to(pipe.vq.device))[0].float()
    pixels = ((decoded.permute(1, 2, 0).cpu().numpy() + 1) * 127.5).clip(0, 255)
    patch = pixels.shape[0] // grid
    mask = np.kron(done.numpy(), np.ones((patch, patch), dtype=bool))
    pixels[~mask] = PENDING_GREY
    return PIL.Image.fromarray(pixels.round().astype(np.uint8))


def run_streaming(pipe: LlamaGenPipeline, **kwargs: Any) -> Iterator[tuple[PIL.Image.Image | None, Any]]:
    """Run ``pipe(**kwargs)`` in a worker thread; while it runs, yield ``(preview, None)`` every
    ``PREVIEW_INTERVAL_S`` in which it made progress; then ``(None, output)``.

    The callback only keeps a reference to the newest step's tensors, and this thread looks at
    them on a timer, not at every step: decoding or even waking up per step would compete with
    the generation for the GIL and inflate the wall time the demo reports.
    """
    latest: dict[str, Any] = {}

    def on_step(_pipe, _step, _timestep, callback_kwargs: dict) -> dict:
        latest["kwargs"] = callback_kwargs
        return callback_kwargs

    # The `with` block waits for the worker even if the client goes away mid-run, so the queue's
    # concurrency limit keeps meaning "one generation at a time".
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(pipe, **kwargs, callback_on_step_end=on_step)
        shown = 0
        while not wait([future], timeout=PREVIEW_INTERVAL_S).done:
            step = latest.get("kwargs")
            if step is not None and int(step["num_generated"][0]) > shown:  # only progress is worth a picture
                shown = int(step["num_generated"][0])
                yield preview_image(pipe, shown, step["tokens"][0]), None
        yield None, future.result()


def stats_markdown(rows: list[tuple[str, Any]], record: dict) -> str:
    """A table of steps, wall time and tokens per step for each run, then the speed-up (if any)."""
    lines = ["| run | steps (NFE) | wall time | tokens / step (with bonus) |", "|---|---:|---:|---:|"]
    for name, stats in rows:
        lines.append(f"| {name} | {stats.steps} | {stats.total_time:.3f} s | {stats.mean_tokens_per_step:.2f} |")
    if "speedup_wall_time" in record:
        lines.append(
            f"\n**Speed-up: {record['speedup_wall_time']:.2f}× wall time, {record['speedup_steps']:.2f}× fewer steps.**"
        )
    return "\n".join(lines)


def build_image_demo(
    pipe: LlamaGenPipeline,
    class_names: list[str] | None = None,
    warmup: bool = True,
    mar: tuple[Any, list[str] | None] | None = None,
    video: tuple[Any, float] | None = None,
) -> gr.Blocks:
    """The image-generation demo for ``pipe`` (a class-conditional :class:`LlamaGenPipeline`).

    Named endpoint ``/generate``: ``(class_label, seed, method, acceptance, num_draft_tokens,
    guidance_scale, temperature, top_k)`` -> ``(baseline image, method image, heat-map, summary
    markdown, stats JSON)``. ``method="none"`` runs the baseline only; ``top_k=0`` means no top-k.
    ``class_names``: shown next to the class ids (index = class id). ``warmup``: run the baseline
    and every method once before serving. ``mar``: ``(MARPipeline with a drafter, class names or
    None)`` adds the MAR tab (:mod:`.mar_tab`, endpoint ``/generate_mar``); ``video``:
    ``(VideoPipeline with drafter and scorer, tau, VideoDefaults)`` adds the video tab (:mod:`.video_tab`, endpoint
    ``/generate_video``).
    """
    pipe.set_progress_bar_config(disable=True)  # progress is streamed to the page, not the server log
    methods = runnable_methods(pipe)
    if warmup:
        # First calls pay one-off costs (allocations; compilation and CUDA-graph capture after
        # enable_compile()): paid here, they stay out of the wall times the page compares.
        for method in [None, *methods]:
            pipe(class_labels=[0], speculative=method, generator=torch.Generator(pipe.device).manual_seed(0))
    rules = buildable_rules(pipe)
    classes = class_choices(pipe, class_names)

    def generate(class_label, seed, method, acceptance, num_draft_tokens, guidance_scale, temperature, top_k):
        """Baseline then method on the same seed, streaming previews; see build_image_demo.

        The components' own bounds and choices are checked by Gradio before this runs (for API
        calls too); settings the pipeline rejects come back as its ValueError's message.
        """
        if seed is None:
            raise gr.Error("Enter a seed (an integer).")
        seed = int(seed)
        class_label = parse_class_label(class_label, pipe.target.config.num_classes)
        common = dict(
            class_labels=[class_label], guidance_scale=guidance_scale, temperature=temperature, top_k=int(top_k) or None
        )
        runs = [("baseline", {"speculative": None})]
        if method != BASELINE:
            rule = None if acceptance == DEFAULT_RULE else acceptance
            runs.append(
                (
                    f"{method} ({acceptance})",
                    {"speculative": method, "num_draft_tokens": int(num_draft_tokens), "acceptance": rule},
                )
            )
        with tempfile.TemporaryDirectory() as scratch:  # pictures go out as files (see save_png)

            def png(image: PIL.Image.Image, name: str) -> str:
                return save_png(scratch, image, name)

            images, rows = [None, None], []
            for slot, (name, extra) in enumerate(runs):
                generator = torch.Generator(pipe.device).manual_seed(seed)  # same seed for both runs
                with pipeline_errors():
                    for preview, out in run_streaming(pipe, **common, **extra, generator=generator):
                        if out is None:
                            images[slot] = png(preview, SLOTS[slot])
                            yield *images, None, f"Generating **{name}**…", None
                images[slot] = png(out.images[0], SLOTS[slot])
                rows.append((name, out.stats))
            record = {
                "seed": seed,
                "method": method,
                "acceptance": acceptance,
                "runs": {name: stats.summary() for name, stats in rows},
            }
            heatmap = None
            if method != BASELINE:
                (_, base), (_, spec) = rows
                record["speedup_wall_time"] = base.total_time / spec.total_time
                record["speedup_steps"] = base.steps / max(spec.steps, 1)
                grid = pipe.target.grid_size
                heatmap = png(
                    acceptance_heatmap(
                        spec.token_source[0].reshape(grid, grid),
                        spec.token_step[0].reshape(grid, grid),
                        cell=max(PICTURE_SIZE // grid, 1),
                    ),
                    "heatmap",
                )
            yield *images, heatmap, stats_markdown(rows, record), record

    with gr.Blocks(title="mmspec: speculative image generation") as demo:
        with gr.Tab("Images"):
            gr.Markdown(
                "# Speculative image generation\n"
                "The plain autoregressive baseline and a speculative method run with the same seed. With "
                "sampling (temperature > 0) the two pictures usually differ even for lossless rules: those are "
                "lossless *in distribution* (every image is as likely as under the baseline), not draw for draw; "
                "only greedy decoding (temperature 0) gives the same picture. Relaxed rules (LANTERN, GSD) trade "
                "a bounded change of distribution for speed. The heat-map shows where drafts were "
                "accepted (green), resampled after a rejection (red) or added as the bonus token (blue); "
                "shades alternate between verify steps."
            )
            with gr.Row():
                with gr.Column(scale=1):
                    # Custom values let API clients send the id as text ("0"); generate() checks it.
                    class_label = gr.Dropdown(classes, value=classes[0][1], label="Class", allow_custom_value=True)
                    seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                    method = gr.Dropdown(
                        [BASELINE, *methods], value=methods[0] if methods else BASELINE, label="Method"
                    )
                    acceptance = gr.Dropdown(rules, value=DEFAULT_RULE, label="Acceptance rule")
                    with gr.Accordion("Knobs", open=False):
                        num_draft_tokens = gr.Slider(
                            1, MAX_DRAFT_TOKENS, value=8, step=1, label="Draft tokens per step"
                        )
                        guidance_scale = gr.Slider(1.0, 20.0, value=4.0, step=0.5, label="Guidance scale (CFG)")
                        temperature = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Temperature (0 = greedy)")
                        top_k = gr.Slider(0, pipe.target.vocab_size, value=0, step=1, label="Top-k (0 = off)")
                    run = gr.Button("Generate", variant="primary", elem_id="generate-button")
                with gr.Column(scale=2):
                    with gr.Row():
                        baseline_image, method_image, heatmap_image = (
                            gr.Image(label=label, height=PICTURE_SIZE, elem_id=elem_id, elem_classes="mmspec-pixels")
                            for label, elem_id in (
                                ("Baseline", "baseline-image"),
                                ("Speculative", "method-image"),
                                ("Acceptance heat-map", "heatmap-image"),
                            )
                        )
                    summary = gr.Markdown(label="Summary", elem_id="summary")
                    with gr.Accordion("Stats (JSON)", open=False):
                        record = gr.JSON(label="Stats")
            run.click(
                generate,
                [class_label, seed, method, acceptance, num_draft_tokens, guidance_scale, temperature, top_k],
                [baseline_image, method_image, heatmap_image, summary, record],
                api_name="generate",
            )
        if mar is not None:
            from .mar_tab import add_mar_tab

            add_mar_tab(*mar, warmup=warmup)
        if video is not None:
            from .video_tab import add_video_tab

            add_video_tab(*video, warmup=warmup)
    return demo
