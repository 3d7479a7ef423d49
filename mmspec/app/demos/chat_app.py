"""Gradio app: visual chat with a VLM, the answer streamed while it is generated, the tokens that
were drafted and accepted highlighted, tokens/s and accepted length, and an optional A/B run of the
plain baseline on the same inputs.

Thin by design: the answer, its tokens and every number come from ``VLMPipeline.__call__`` and its
``SpecStats``; this module only validates the upload, calls the pipeline and lays out the results.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import gradio as gr
import PIL.Image
import torch

from mmspec.app.visualize import SOURCE_COLOURS
from mmspec.pipelines.vlm.pipeline_vlm import VLMPipeline
from mmspec.stats import SOURCE_ACCEPTED
from mmspec.types import Drafter

from .serving import MAX_UPLOAD_MB, pipeline_errors

BASELINE = "none (baseline)"
ACCEPTED = "drafted + accepted"
MAX_IMAGE_SIDE = 4096
MAX_NEW_TOKENS = 512
MAX_DRAFT_TOKENS = 16
MAX_SEED = 2**31 - 1
#: Longest question accepted, in tokens (checked with the model's tokenizer) and, before
#: tokenizing, in characters (the text box also stops typing there): a huge question would hold
#: the single generation queue for minutes.
MAX_QUESTION_TOKENS = 256
MAX_QUESTION_CHARS = 2000


def check_question(pipe: VLMPipeline, question: str | None) -> str:
    """The question, or a ``gr.Error`` if it is empty or longer than the limits above."""
    if not question or not question.strip():
        raise gr.Error("Ask a question about the image.")
    if len(question) > MAX_QUESTION_CHARS:
        raise gr.Error(
            f"The question is {len(question):,} characters long; the limit is {MAX_QUESTION_CHARS:,} "
            f"characters ({MAX_QUESTION_TOKENS} tokens)."
        )
    tokens = len(pipe.processor.tokenizer(question, add_special_tokens=False).input_ids)
    if tokens > MAX_QUESTION_TOKENS:
        raise gr.Error(f"The question is {tokens} tokens long; the limit is {MAX_QUESTION_TOKENS} tokens.")
    return question


def load_upload(path: str | None) -> PIL.Image.Image:
    """The uploaded file as an RGB image, or a ``gr.Error`` that says what is wrong with it
    (missing, larger than ``MAX_UPLOAD_MB``, not an image, more than ``MAX_IMAGE_SIDE`` px a side).

    Sizes are checked from the file and the image header before any pixel is decoded.
    """
    if path is None:
        raise gr.Error("Upload an image first.")
    name = os.path.basename(path)
    megabytes = os.path.getsize(path) / 2**20
    if megabytes > MAX_UPLOAD_MB:
        raise gr.Error(f"{name} is {megabytes:.1f} MB; the limit is {MAX_UPLOAD_MB} MB.")
    try:
        image = PIL.Image.open(path)
    except PIL.Image.DecompressionBombError as err:
        raise gr.Error(f"{name} is far larger than {MAX_IMAGE_SIDE} pixels a side ({err}).") from err
    except OSError as err:
        raise gr.Error(f"{name} is not an image this app can read (PNG, JPEG, WebP, GIF, BMP...).") from err
    with image:
        if max(image.size) > MAX_IMAGE_SIDE:
            raise gr.Error(
                f"{name} is {image.width}×{image.height} pixels; the limit is {MAX_IMAGE_SIDE} pixels a side."
            )
        try:
            return image.convert("RGB")
        except OSError as err:  # a valid header over truncated or corrupt pixel data
            raise gr.Error(f"{name} is damaged and cannot be decoded: {err}") from err


def default_drafters(pipe: VLMPipeline) -> dict[str, Drafter]:
    """One drafter per registered method the pipeline can run (``pipe.methods``: its own drafter,
    prompt lookup, ...), labelled with the method's description."""
    drafters: dict[str, Drafter] = {}
    for name in pipe.methods.available(pipe):
        method = pipe.methods.get(name)
        drafter = method.build(pipe, method.resolve_options(None))
        label = f"{name}: {type(drafter).__name__}" if name == "model" else f"{name}: {method.description}"
        drafters[label] = drafter
    return drafters


def highlighted_answer(pipe: VLMPipeline, out: Any) -> list[tuple[str, str | None]]:
    """The reply split into one piece per token, labelled ``ACCEPTED`` where the token was a draft
    the target accepted (``stats.token_source``).

    Pieces come from decoding growing prefixes and keeping what they share with the full reply, so
    tokens that only make sense together (merged spaces, multi-byte characters) still add up to
    exactly the reply's text; such a token's text goes to the token that completes it.
    """
    reply = out.text[0]
    ids = out.token_ids[0, : int(out.lengths[0])].tolist()
    sources = out.stats.token_source[0, : len(ids)].tolist()
    pieces, done = [], 0
    for i, source in enumerate(sources):
        prefix = pipe.processor.tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        end = max(len(os.path.commonprefix([prefix, reply])), done)
        if end > done:
            pieces.append((reply[done:end], ACCEPTED if source == SOURCE_ACCEPTED else None))
            done = end
    return pieces


def stream_answer(
    pipe: VLMPipeline, image: PIL.Image.Image, question: str, seed: int, **kwargs: Any
) -> Iterator[tuple[str, Any]]:
    """Yield ``(answer so far, None)`` after every verify step, then ``(answer, pipeline output)``."""
    generator = torch.Generator(pipe.target.device).manual_seed(seed)
    stream = pipe(image, question, generator=generator, stream=True, **kwargs)
    text = ""
    while True:
        try:
            text += next(stream)
        except StopIteration as stop:
            yield text, stop.value
            return
        yield text, None


def run_stats(out: Any) -> dict:
    """Throughput and accepted length of one call (both accepted-length conventions, named)."""
    stats = out.stats
    tokens = int(out.lengths[0])
    return {
        "tokens": tokens,
        "steps": stats.steps,
        "wall_time_s": stats.total_time,
        "tokens_per_s": tokens / stats.total_time,
        "mean_accepted_without_bonus": stats.mean_accepted,
        "mean_tokens_per_step_with_bonus": stats.mean_tokens_per_step,
    }


def stats_markdown(runs: dict[str, dict], record: dict) -> str:
    """A table of the runs, then the speed-up and whether the answers agree (if both ran)."""
    lines = ["| run | tokens | steps | tokens/s | accepted / step (without bonus) |", "|---|---:|---:|---:|---:|"]
    for name, run in runs.items():
        lines.append(
            f"| {name} | {run['tokens']} | {run['steps']} | {run['tokens_per_s']:.1f} | "
            f"{run['mean_accepted_without_bonus']:.2f} |"
        )
    if "speedup_tokens_per_s" in record:
        same = "identical" if record["same_answer"] else "different (expected only when sampling or with a lossy rule)"
        lines.append(f"\n**Speed-up: {record['speedup_tokens_per_s']:.2f}× tokens/s.** Answers: {same}.")
    return "\n".join(lines)


def build_chat_demo(pipe: VLMPipeline, drafters: dict[str, Drafter] | None = None, warmup: bool = True) -> gr.Blocks:
    """The visual-chat demo for ``pipe`` (a :class:`VLMPipeline`).

    ``drafters``: name -> drafter offered in the UI (default: :func:`default_drafters`).
    ``warmup``: answer once with every drafter and the baseline before serving, so first-call
    costs stay out of the timings the page compares.

    Named endpoint ``/chat``: ``(image file, question, drafter name, num_draft_tokens,
    max_new_tokens, temperature, seed, compare with baseline)`` -> ``(highlighted answer, summary
    markdown, baseline answer, stats JSON)``.
    """
    drafters = default_drafters(pipe) if drafters is None else drafters
    if warmup:
        blank = PIL.Image.new("RGB", (64, 64), (127, 127, 127))
        for drafter in [None, *drafters.values()]:
            pipe(blank, "Describe the image.", max_new_tokens=8, drafter=drafter, num_draft_tokens=4 if drafter else 0)

    def chat(image_path, question, drafter_name, num_draft_tokens, max_new_tokens, temperature, seed, compare):
        """Stream the chosen drafter's answer, then (if asked) the baseline's; see build_chat_demo."""
        image = load_upload(image_path)
        question = check_question(pipe, question)
        if seed is None:
            raise gr.Error("Enter a seed (an integer).")
        drafter = drafters.get(drafter_name)
        # Both runs go through the same streaming path, with the same seed, so their timings compare.
        settings = dict(max_new_tokens=int(max_new_tokens), temperature=temperature)
        record: dict[str, Any] = {"drafter": drafter_name}
        with pipeline_errors():
            for text, out in stream_answer(
                pipe,
                image,
                question,
                **settings,
                seed=int(seed),
                drafter=drafter,
                num_draft_tokens=int(num_draft_tokens) if drafter else 0,
            ):
                if out is None:
                    yield [(text, None)], "Generating…", None, None
            pieces = highlighted_answer(pipe, out)
            runs = {drafter_name: run_stats(out)}
            record["answer"] = out.text[0]
            baseline_text = None
            if compare and drafter is not None:
                for baseline_text, base in stream_answer(
                    pipe, image, question, **settings, seed=int(seed), num_draft_tokens=0
                ):
                    if base is None:
                        yield pieces, "Running the baseline…", baseline_text, None
                runs[BASELINE] = run_stats(base)
                record.update(
                    baseline_answer=base.text[0],
                    same_answer=base.text[0] == out.text[0],
                    speedup_tokens_per_s=runs[drafter_name]["tokens_per_s"] / runs[BASELINE]["tokens_per_s"],
                )
        record["runs"] = runs
        yield pieces, stats_markdown(runs, record), baseline_text, record

    with gr.Blocks(title="mmspec: speculative visual chat") as demo:
        gr.Markdown(
            "# Speculative visual chat\n"
            f"Ask about an image (up to {MAX_UPLOAD_MB} MB, {MAX_IMAGE_SIDE} px a side). Tokens a drafter proposed "
            "and the target accepted are highlighted; tick the box to run the plain baseline on the same inputs."
        )
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="image-upload")
                preview = gr.Image(label="Preview", interactive=False, height=220, elem_id="image-preview")
                question = gr.Textbox(
                    label=f"Question (up to {MAX_QUESTION_TOKENS} tokens)",
                    value="Describe the image.",
                    max_length=MAX_QUESTION_CHARS,
                    elem_id="question",
                )
                drafter_name = gr.Dropdown([*drafters, BASELINE], value=next(iter(drafters), BASELINE), label="Drafter")
                compare = gr.Checkbox(value=True, label="Compare with the baseline (A/B)")
                with gr.Accordion("Knobs", open=False):
                    num_draft_tokens = gr.Slider(1, MAX_DRAFT_TOKENS, value=4, step=1, label="Draft tokens per step")
                    max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=64, step=1, label="Max new tokens")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                    seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                run = gr.Button("Ask", variant="primary", elem_id="ask-button")
            with gr.Column(scale=2):
                green = "#" + "".join(f"{c:02x}" for c in SOURCE_COLOURS[SOURCE_ACCEPTED])  # as in the image heat-maps
                answer = gr.HighlightedText(
                    label="Answer", color_map={ACCEPTED: green}, show_legend=True, elem_id="answer"
                )
                summary = gr.Markdown(label="Summary", elem_id="summary")
                baseline_answer = gr.Textbox(label="Baseline answer", interactive=False)
                with gr.Accordion("Stats (JSON)", open=False):
                    record = gr.JSON(label="Stats")
        # Uploads are checked (and previewed) at once; cheap, so not queued behind a generation.
        upload.upload(load_upload, upload, preview, api_name="check_image", concurrency_limit=None)
        run.click(
            chat,
            [upload, question, drafter_name, num_draft_tokens, max_new_tokens, temperature, seed, compare],
            [answer, summary, baseline_answer, record],
            api_name="chat",
        )
    return demo
