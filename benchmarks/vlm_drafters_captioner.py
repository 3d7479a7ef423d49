"""Compare VLM drafters on the embedded captioner (benchmarks/RESULTS.md, "VLM drafters").

Usage: ``python benchmarks/vlm_drafters_captioner.py DRAFTERS_DIR`` where ``DRAFTERS_DIR/<path>`` holds a
drafter trained with ``mmspec train-drafter --target-kind vlm --visual-path <path>`` for each visual path.
Greedy captions of held-out emoji scenes, 4 drafts per step, exact acceptance; writes
``benchmarks/results/vlm-drafters-captioner-cpu.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from mmspec.defaults import load_default_captioner
from mmspec.drafters import NGramDrafter
from mmspec.drafters.eagle import TreeConfig
from mmspec.pipelines.vlm import VISUAL_PATHS, VLMEagleDrafter
from mmspec.training.captioner import CaptionDataConfig

QUESTION = "What is in the image?"
NUM_DRAFT_TOKENS = 4
TREE = TreeConfig(depth=4, top_k=3, total_nodes=10)


def caption_all(pipe, images, drafter) -> tuple[dict, list[str]]:
    """Caption every image in batches of 64; steps summed over batches, accepted drafts per step."""
    start = time.perf_counter()
    steps = accepted = row_steps = 0
    texts: list[str] = []
    for i in range(0, len(images), 64):
        batch = images[i : i + 64]
        out = pipe([[image] for image in batch], [QUESTION] * len(batch), max_new_tokens=16, drafter=drafter,
                   num_draft_tokens=NUM_DRAFT_TOKENS if drafter is not None else 0)
        steps += out.stats.steps
        accepted += int(out.stats.row_accepted.sum())
        row_steps += int(out.stats.row_steps.sum())
        texts += out.text
    record = {"steps": steps, "accepted_per_step_without_bonus": accepted / max(row_steps, 1),
              "wall_s": time.perf_counter() - start}
    return record, texts


def main(drafters_dir: Path) -> None:
    torch.set_num_threads(1)
    pipe = load_default_captioner()
    dataset = CaptionDataConfig(heldout_samples=256).dataset(heldout=True)
    images = [dataset[i]["image"] for i in range(len(dataset))]
    rows, baseline_texts = {}, None
    candidates = [("baseline", None), ("draft model (1-layer LM, shipped)", pipe.drafter),
                  ("ngram", NGramDrafter(pipe.target.vocab_size))]
    for path in VISUAL_PATHS:
        for tree in (None, TREE):
            name = f"{path} ({'tree 4x3/10' if tree else 'chain 4'})"
            candidates.append((name, VLMEagleDrafter.from_pretrained(drafters_dir / path, pipe.target, tree=tree)))
    for name, drafter in candidates:
        rows[name], texts = caption_all(pipe, images, drafter)
        if baseline_texts is None:
            baseline_texts = texts
        rows[name]["equal_to_baseline"] = texts == baseline_texts
        print(name, rows[name])
    out = Path(__file__).parent / "results" / "vlm-drafters-captioner-cpu.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
