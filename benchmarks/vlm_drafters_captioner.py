"""Compare VLM drafters on a captioner (benchmarks/RESULTS.md, "VLM drafters" sections).

Usage: ``python benchmarks/vlm_drafters_captioner.py DRAFTERS_DIR [--model CAPTIONER_DIR] [--output JSON]``
where ``DRAFTERS_DIR/<path>`` holds a drafter trained with ``mmspec train-drafter --target-kind vlm
--visual-path <path>`` for the visual paths to compare (every path of ``VISUAL_PATHS`` for the embedded
captioner; with ``--model``, those present). ``--model``: a captioner folder written by ``mmspec
train-captioner`` (default: the embedded captioner); its draft model, if it has one, is measured too.
Greedy captions of held-out emoji scenes (the model's own data configuration, 256 scenes by
default), 4 drafts per step, exact acceptance; writes
``benchmarks/results/vlm-drafters-captioner-cpu.json`` unless ``--output`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mmspec.app.defaults import default_captioner_path
from mmspec.drafters import NGramDrafter
from mmspec.drafters.eagle import TreeConfig
from mmspec.pipelines.vlm import VISUAL_PATHS, VLMEagleDrafter
from mmspec.training.captioner_data import CaptionDataConfig
from mmspec.training.captioner_model import DEFAULT_QUESTION
from mmspec.training.reference import RECIPE_FILE
from mmspec.training.saved import load_captioner_pipeline

NUM_DRAFT_TOKENS = 4
TREE = TreeConfig(depth=4, top_k=3, total_nodes=10)


class TimedDrafter:
    """Times every ``draft`` call of the wrapped drafter (drafting cost per step)."""

    def __init__(self, inner) -> None:
        self.inner, self.draft_seconds, self.draft_calls = inner, 0.0, 0
        self.vocab_size = inner.vocab_size

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def draft(self, ctx, k, generator):
        start = time.perf_counter()
        out = self.inner.draft(ctx, k, generator)
        self.draft_seconds += time.perf_counter() - start
        self.draft_calls += 1
        return out


def caption_all(
    pipe, images, drafter, batch_size: int, num_draft_tokens: int = NUM_DRAFT_TOKENS
) -> tuple[dict, list[str]]:
    """Caption every image in batches; steps summed over batches, accepted drafts per step, and the
    drafting time per step (every ``draft`` call timed)."""
    timed = TimedDrafter(drafter) if drafter is not None else None
    start = time.perf_counter()
    steps = accepted = row_steps = 0
    texts: list[str] = []
    for i in range(0, len(images), batch_size):
        batch = images[i : i + batch_size]
        out = pipe(
            [[image] for image in batch],
            [DEFAULT_QUESTION] * len(batch),
            max_new_tokens=16,
            drafter=timed,
            num_draft_tokens=num_draft_tokens if drafter is not None else 0,
        )
        steps += out.stats.steps
        accepted += int(out.stats.row_accepted.sum())
        row_steps += int(out.stats.row_steps.sum())
        texts += out.text
    per_step = accepted / max(row_steps, 1)
    record = {
        "steps": steps,
        "accepted_per_step_without_bonus": per_step,
        "tokens_per_step_with_bonus": per_step + 1,
        "wall_s": time.perf_counter() - start,
    }
    if timed is not None:
        record["draft_ms_per_step"] = 1000 * timed.draft_seconds / max(timed.draft_calls, 1)
    return record, texts


def heldout_images(model_dir: Path, num_images: int) -> tuple[list, list[str]]:
    """Held-out scenes (PIL) and captions of the data configuration recorded with the model."""
    settings = json.loads((model_dir / RECIPE_FILE).read_text())["config"]["data"]
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    dataset = CaptionDataConfig(**{**settings, "heldout_samples": num_images}).dataset(heldout=True)
    items = [dataset[i] for i in range(len(dataset))]
    return [item["image"] for item in items], [item["caption"] for item in items]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("drafters_dir", type=Path, help="folder of trained VLM drafters, one subfolder per visual path")
    parser.add_argument("--model", type=Path, default=None, help="captioner folder (default: the embedded captioner)")
    parser.add_argument(
        "--draft-model-name",
        default="draft model (1-layer LM, shipped)",
        help="row name of the captioner's own draft model",
    )
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).parent / "results" / "vlm-drafters-captioner-cpu.json"
    )
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = args.model or default_captioner_path()
    pipe = load_captioner_pipeline(model_dir)
    images, captions = heldout_images(model_dir, args.num_images)
    paths = VISUAL_PATHS if args.model is None else [p for p in VISUAL_PATHS if (args.drafters_dir / p).is_dir()]
    candidates = [("baseline", None)]
    if pipe.drafter is not None:
        candidates.append((args.draft_model_name, pipe.drafter))
    candidates.append(("ngram", NGramDrafter(pipe.target.vocab_size)))
    for path in paths:
        for tree in (None, TREE):
            name = f"{path} ({'tree 4x3/10' if tree else 'chain 4'})"
            candidates.append((name, VLMEagleDrafter.from_pretrained(args.drafters_dir / path, pipe.target, tree=tree)))
    rows, baseline_texts = {}, None
    for name, drafter in candidates:
        rows[name], texts = caption_all(pipe, images, drafter, args.batch_size)
        if baseline_texts is None:
            baseline_texts = texts
            rows[name]["exact_match_captions"] = sum(t == c for t, c in zip(texts, captions)) / len(captions)
        rows[name]["equal_to_baseline"] = texts == baseline_texts
        print(name, rows[name], flush=True)
    record = {"model": str(model_dir), "num_images": len(images), "threads": args.threads, "rows": rows}
    args.output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
