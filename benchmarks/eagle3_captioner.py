"""EAGLE-3 vs the EAGLE-2-style VLM head vs the draft model on a captioner (benchmarks/RESULTS.md,
"EAGLE-3 on the SmolLM2-135M VLM").

Usage: ``python benchmarks/eagle3_captioner.py --model CAPTIONER_DIR --drafter NAME=DIR ... [--output JSON]``
where each ``DIR`` holds a drafter written by ``mmspec train-drafter`` (``--arch eagle3``: an EAGLE-3
head, or in the serving format; otherwise a vision-aware EAGLE head). The captioner's own draft
model is measured too. Greedy captions of held-out emoji scenes, 4 drafts per step (chains), exact
acceptance. Per drafter: steps, accepted drafts per step (without the bonus token), drafting time
per step (every ``draft`` call timed: head forwards, LM head over the (draft) vocabulary, sampling),
wall time, and whether every caption equals the baseline's.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from vlm_drafters_captioner import caption_all, heldout_images  # noqa: E402  (the benchmarks folder is on sys.path)

from mmspec.drafters.eagle import EagleDrafter, TreeConfig
from mmspec.drafters.eagle3 import ARCH, ARCH_KEY
from mmspec.drafters.eagle3_format import is_eagle3_dir
from mmspec.pipelines.vlm import VLMEagleDrafter
from mmspec.pipelines.vlm.eagle3 import load_eagle3_drafter
from mmspec.training.saved import load_captioner_pipeline

NUM_DRAFT_TOKENS = 4
TREE = TreeConfig(depth=4, top_k=3, total_nodes=10)


def load_drafter(path: Path, target):
    saved = json.loads((path / "config.json").read_text())
    if saved.get(ARCH_KEY) == ARCH or is_eagle3_dir(path):
        return load_eagle3_drafter(path, target)
    return VLMEagleDrafter.from_pretrained(path, target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="captioner folder written by mmspec train-captioner")
    parser.add_argument(
        "--drafter", action="append", default=[], metavar="NAME=DIR", help="a drafter to measure (repeatable)"
    )
    parser.add_argument("--draft-model-name", default="draft model (captioner recipe)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "eagle3-captioner-cpu.json")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--trees", action="store_true", help="also measure every EAGLE-style drafter with EAGLE-2 trees 4x3/10"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_captioner_pipeline(args.model)
    images, captions = heldout_images(args.model, args.num_images)
    candidates = [("baseline", None)]
    if pipe.drafter is not None:
        candidates.append((args.draft_model_name, pipe.drafter))
    for spec in args.drafter:
        name, _, path = spec.partition("=")
        drafter = load_drafter(Path(path), pipe.target)
        candidates.append((name, drafter))
        if args.trees and isinstance(drafter, EagleDrafter):
            tree_drafter = copy.copy(drafter)
            tree_drafter.tree = TREE
            candidates.append((name.replace("chain 4", "tree 4x3/10"), tree_drafter))
    rows, baseline_texts = {}, None
    for name, drafter in candidates:
        k = TREE.depth if getattr(drafter, "tree", None) is not None else NUM_DRAFT_TOKENS
        rows[name], texts = caption_all(pipe, images, drafter, args.batch_size, k)
        if baseline_texts is None:
            baseline_texts = texts
            rows[name]["exact_match_captions"] = sum(t == c for t, c in zip(texts, captions)) / len(captions)
        rows[name]["equal_to_baseline"] = texts == baseline_texts
        print(name, rows[name], flush=True)
    record = {
        "model": str(args.model),
        "num_images": len(images),
        "threads": args.threads,
        "num_draft_tokens": NUM_DRAFT_TOKENS,
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
