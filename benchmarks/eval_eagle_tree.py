"""``mmspec eval`` for EAGLE-2 dynamic trees: the same report (steps, accepted length, TVD, FID with its
noise floor) with every ``eagle`` method drafting a tree instead of a chain.

``mmspec eval`` drafts EAGLE chains only; the official LANTERN code's dynamic-tree residual
(``official_path="dynamic"``, chosen automatically for trees: their drafts are deterministic top-k
children) needs trees. This script runs :func:`mmspec.app.evaluation.evaluate_llamagen` on the embedded
reference model with a tree budget for the ``eagle`` methods::

    python benchmarks/eval_eagle_tree.py --tree 4,4,16 --num-images 96 --batch-size 16 --threads 1 \\
        --method eagle:lantern:delta=0.1,k=100 --method eagle:lantern:variant=official,delta=0.1,k=100 \\
        --output-dir benchmarks/results/eval-official-tree-cpu

Run it from outside the checkout root (the root's ``kernels/`` folder would shadow a PyPI package).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mmspec.app.defaults import load_default_llamagen
from mmspec.app.evaluation import EvalMethod, evaluate_llamagen, format_report
from mmspec.drafters.eagle import TreeConfig
from mmspec.pipelines.llamagen.pipeline_llamagen import SpeculativeOptions


class _TreePipe:
    """The pipeline, with ``speculative_options`` (the tree budget) added to every ``eagle`` call."""

    def __init__(self, pipe, options: SpeculativeOptions) -> None:
        self._pipe, self._options = pipe, options

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, *args, **kwargs):
        if kwargs.get("speculative") == "eagle":
            kwargs["speculative_options"] = self._options
        return self._pipe(*args, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", action="append", required=True, help="as mmspec eval's --method")
    parser.add_argument("--tree", default="4,4,16", metavar="DEPTH,TOP_K,NODES", help="EAGLE-2 tree budget")
    parser.add_argument("--num-images", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output-dir", type=Path, required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    depth, top_k, nodes = (int(v) for v in args.tree.split(","))
    pipe = load_default_llamagen()
    pipe.set_progress_bar_config(disable=True)
    labels = [i % pipe.target.config.num_classes for i in range(args.num_images)]  # as mmspec eval
    sampling = {
        "guidance_scale": args.guidance_scale,
        "temperature": args.temperature,
        "top_k": None,
        "num_draft_tokens": depth,
    }  # mmspec eval's defaults; trees draft paths of the tree's depth
    report = evaluate_llamagen(
        _TreePipe(pipe, SpeculativeOptions(eagle_tree=TreeConfig(depth, top_k, nodes))),
        [EvalMethod.parse(m) for m in args.method],
        labels,
        seed=args.seed,
        batch_size=args.batch_size,
        sampling=sampling,
        out_dir=args.output_dir,
    )
    report["eagle_tree"] = {"depth": depth, "top_k": top_k, "total_nodes": nodes}
    (args.output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))


if __name__ == "__main__":
    main()
