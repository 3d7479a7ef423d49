"""Evaluation of a trained captioner and its drafter (what the model card reports) and the
example-caption grid (:mod:`mmspec.training.captioner`)."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from ..drafters import NGramDrafter
from ..pipelines.vlm import VLMPipeline
from ..stats import SOURCE_ACCEPTED
from .captioner_data import (
    CaptionDataConfig,
    CaptionExamples,
    _chunks,
    caption_loss,
    render_caption_data,
    reply_token_budget,
)
from .captioner_model import DEFAULT_QUESTION, IGNORE_INDEX, chat_prompt


# ---------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def teacher_forced_accuracy(
    model: LlavaForConditionalGeneration, examples: CaptionExamples, question: int = 0, batch_size: int = 64
) -> tuple[float, float]:
    """``(cross-entropy, token accuracy)`` over every answer token of ``examples`` (teacher forced)."""
    loss_sum = correct = count = 0.0
    for rows in _chunks(len(examples.answers), batch_size):
        batch = examples.batch(list(rows), [question] * len(rows))
        tokens = float((batch.labels[:, 1:] != IGNORE_INDEX).sum())
        loss, accuracy = caption_loss(model, batch)
        loss_sum += float(loss) * tokens
        correct += float(accuracy) * tokens
        count += tokens
    return loss_sum / count, correct / count


@torch.no_grad()
def evaluate_captioner(
    pipe: VLMPipeline,
    data: CaptionDataConfig,
    hf_model: LlavaForConditionalGeneration | None = None,
    question: str = DEFAULT_QUESTION,
    num_draft_tokens: int = 4,
    batch_size: int = 64,
    hf_check_samples: int = 64,
) -> dict[str, Any]:
    """Measure a captioner on the held-out scenes of ``data`` (greedy decoding throughout).

    Args:
        pipe: the pipeline to measure (its ``drafter``, if any, is measured too).
        hf_model: the same model as a transformers model: adds teacher-forced token accuracy and
            the agreement of the pipeline's greedy replies with ``hf_model.generate`` on the first
            ``hf_check_samples`` scenes.
        question: the prompt.
        num_draft_tokens: drafts per step for the speculative runs.

    Returns:
        A JSON-ready dict: ``exact_match`` (share of replies equal to the caption), ``per_class_exact``
        (classes all of whose held-out scenes are right, as a share), ``generated_token_accuracy``
        (reply tokens equal to the reference at the same position, over the reference's tokens incl.
        ``</s>``), and with ``hf_model``: ``teacher_forced_token_accuracy``, ``heldout_ce``,
        ``hf_generate_agreement``. ``decoding``: per method (``"baseline"``, ``"draft-model"``,
        ``"ngram"``) total decode ``steps`` (prefill excluded) and ``steps_per_reply``,
        ``accepted_per_step`` (drafts kept per step that are part of a reply, the recovered or
        bonus token excluded), ``tokens_per_step`` (reply tokens after the first, per step),
        ``stats_mean_accepted`` (:attr:`SpecStats.mean_accepted`, which also counts drafts the
        target accepted after ``</s>`` in a reply's last step), ``same_as_baseline`` (identical
        replies) and ``seconds``.
    """
    images, captions, _ = render_caption_data(data, heldout=True)
    tokenizer = pipe.processor.tokenizer
    drafters: dict[str, Any] = {"baseline": None, "ngram": NGramDrafter(pipe.target.vocab_size)}
    if pipe.drafter is not None:
        drafters["draft-model"] = pipe.drafter
    max_new_tokens = reply_token_budget(tokenizer, captions)
    pil = [PIL.Image.fromarray(image) for image in images]
    decoding, replies = {}, {}
    for name, drafter in drafters.items():
        steps = accepted = loop_accepted = tokens = 0
        texts, ids = [], []
        start = time.perf_counter()
        for rows in _chunks(len(pil), batch_size):
            out = pipe(
                [pil[r] for r in rows],
                [question] * len(rows),
                max_new_tokens=max_new_tokens,
                drafter=drafter,
                num_draft_tokens=num_draft_tokens if drafter is not None else 0,
            )
            steps += int(out.stats.row_steps.sum())
            # token_source is -1 past each reply's end, so this counts drafts that made it into a reply.
            accepted += int((out.stats.token_source == SOURCE_ACCEPTED).sum())
            loop_accepted += int(out.stats.row_accepted.sum())
            tokens += int(out.lengths.sum())
            texts += out.text
            ids += [row[:n] for row, n in zip(out.token_ids.tolist(), out.lengths.tolist())]
        replies[name] = (texts, ids)
        # max(..., 1): replies that end with their first (prefill) token take no decode step.
        decoding[name] = {
            "num_draft_tokens": num_draft_tokens if drafter is not None else 0,
            "steps": steps,
            "steps_per_reply": steps / len(pil),
            "accepted_per_step": accepted / max(steps, 1),
            "tokens_per_step": (tokens - len(pil)) / max(steps, 1),  # the first token comes from prefill
            "stats_mean_accepted": loop_accepted / max(steps, 1),
            "same_as_baseline": texts == replies["baseline"][0] and ids == replies["baseline"][1],
            "seconds": time.perf_counter() - start,
        }
    texts, ids = replies["baseline"]
    exact = [t == c for t, c in zip(texts, captions)]
    per_class: dict[str, bool] = {}
    for caption, ok in zip(captions, exact):
        per_class[caption] = per_class.get(caption, True) and ok
    references = [tokenizer.encode(c, add_special_tokens=False) + [tokenizer.eos_token_id] for c in captions]
    matched = sum(sum(a == b for a, b in zip(ref, got)) for ref, got in zip(references, ids))
    result: dict[str, Any] = {
        "heldout_images": len(captions),
        "question": question,
        "exact_match": float(np.mean(exact)),
        "per_class_exact": float(np.mean(list(per_class.values()))),
        "generated_token_accuracy": matched / sum(len(r) for r in references),
        "wrong_examples": [{"caption": c, "reply": t} for t, c, ok in zip(texts, captions, exact) if not ok][:20],
        "decoding": decoding,
    }
    if hf_model is not None:
        examples = CaptionExamples(pipe.processor, images, captions, questions=(question,))
        result["heldout_ce"], result["teacher_forced_token_accuracy"] = teacher_forced_accuracy(hf_model, examples)
        result["hf_generate_agreement"] = _hf_agreement(
            hf_model, pipe.processor, pil[:hf_check_samples], question, ids[:hf_check_samples], max_new_tokens
        )
    return result


def _hf_agreement(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    images: list[PIL.Image.Image],
    question: str,
    pipeline_ids: list[list[int]],
    max_new_tokens: int,
) -> float:
    """Share of ``images`` whose ``model.generate`` greedy reply (cut after ``</s>``) equals the
    pipeline's token ids."""
    eos = processor.tokenizer.eos_token_id
    same = 0
    for image, expected in zip(images, pipeline_ids):
        batch = processor(images=[image], text=[chat_prompt(processor, question)], return_tensors="pt")
        out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens)
        reply = out[0, batch["input_ids"].shape[1] :].tolist()
        reply = reply[: reply.index(eos) + 1] if eos in reply else reply
        same += reply == expected
    return same / max(len(images), 1)


# ---------------------------------------------------------------------------------------- images
def save_caption_grid(
    pipe: VLMPipeline,
    data: CaptionDataConfig,
    path: str | Path,
    n: int = 24,
    columns: int = 6,
    scale: int = 4,
    question: str = DEFAULT_QUESTION,
) -> Path:
    """Write a PNG of ``n`` held-out scenes (upscaled ``scale`` times), each with the model's greedy
    caption under it: black when it equals the true caption, red (with the truth) otherwise."""
    images, captions, _ = render_caption_data(data, heldout=True)
    n = min(n, len(captions))
    # Spread over classes: held-out item i shows class i % num_classes.
    step = len(captions) // n
    picks = list(range(0, step * n, step))[:n]
    pil = [PIL.Image.fromarray(images[i]) for i in picks]
    replies = pipe(pil, [question] * len(pil), max_new_tokens=16).text
    side = data.image_size * scale
    font = PIL.ImageFont.load_default(12)
    line_height, lines, pad = 14, 4, 6
    cell_w, cell_h = side + 2 * pad + 24, side + lines * line_height + 2 * pad
    rows = -(-len(pil) // columns)
    grid = PIL.Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
    draw = PIL.ImageDraw.Draw(grid)
    for i, (image, reply, truth) in enumerate(zip(pil, replies, (captions[p] for p in picks))):
        left, top = (i % columns) * cell_w, (i // columns) * cell_h
        grid.paste(image.resize((side, side), PIL.Image.NEAREST), (left + (cell_w - side) // 2, top + pad))
        text = reply if reply == truth else f"{reply} (true: {truth})"
        wrapped = textwrap.wrap(text, width=cell_w // 7)[:lines]
        for j, line in enumerate(wrapped):
            width = draw.textlength(line, font=font)
            draw.text(
                (left + (cell_w - width) / 2, top + pad + side + 2 + j * line_height),
                line,
                fill=(0, 0, 0) if reply == truth else (200, 0, 0),
                font=font,
            )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out
