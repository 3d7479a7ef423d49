"""SJD vs MC-SJD (maximal / Gumbel coupling) and adaptive vs fixed draft windows on the embedded
reference LlamaGen model (``mmspec/assets/llamagen-emoji``): target forwards, accepted drafts per
step, the coupling's token stability, chosen widths and wall time, every configuration on the same
class labels and seeds, in one process (ratios are within this run).

    python benchmarks/ar_image_mcsjd.py --batch-size 1 --num-images 32 --output benchmarks/results/mcsjd-b1-cpu.json

(run it from outside the checkout root, e.g. ``cd /tmp && python /path/to/benchmarks/ar_image_mcsjd.py``:
the checkout's ``kernels/`` folder must not shadow the installed package). Writes a JSON record and
prints Markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from mmspec.app.defaults import load_default_llamagen
from mmspec.drafters import jacobi

LANTERN = ("lantern", {"delta": 0.1, "k": 100})


def coupling_configs(k: int) -> list[tuple[str, str | None, dict, int, tuple | None]]:
    """(name, method, speculative_options, num_draft_tokens, (rule, rule options) or None)."""
    out = [("baseline", None, {}, k, None)]
    for rule in (None, LANTERN):
        tag = "" if rule is None else " + LANTERN δ=0.1"
        out += [
            (f"sjd k={k}{tag}", "sjd", {}, k, rule),
            (f"mc-sjd maximal k={k}{tag}", "mc-sjd", {}, k, rule),
            (f"mc-sjd gumbel k={k}{tag}", "mc-sjd", {"coupling": "gumbel"}, k, rule),
        ]
    return out


def window_configs(widths: list[int], max_width: int) -> list[tuple]:
    out = [("baseline", None, {}, max_width, None)]
    out += [(f"mc-sjd fixed k={w}", "mc-sjd", {}, w, None) for w in widths]
    out += [
        (f"mc-sjd heuristic (max {max_width})", "mc-sjd", {"window": "heuristic"}, max_width, None),
        (f"mc-sjd cost-aware (max {max_width})", "mc-sjd", {"window": "cost"}, max_width, None),
    ]
    return out


def run_config(pipe, config, labels, batch_size, guidance_scale) -> dict:
    """One pass over every image; returns totals."""
    name, method, options, k, rule = config
    made = []
    original = jacobi.JacobiDrafter.__init__

    def recording_init(self, *args, **kwargs):  # count the coupling's kept guesses across calls
        original(self, *args, **kwargs)
        made.append(self)

    jacobi.JacobiDrafter.__init__ = recording_init
    try:
        steps = row_steps = accepted = 0
        widths: list[int] = []
        kept = coupled = 0
        start = time.perf_counter()
        for s in range(0, len(labels), batch_size):
            out = pipe(
                class_labels=labels[s : s + batch_size],
                guidance_scale=guidance_scale,
                temperature=1.0,
                generator=torch.Generator().manual_seed(s),
                speculative=method,
                num_draft_tokens=k,
                speculative_options=options or None,
                acceptance=None if rule is None else rule[0],
                acceptance_options=None if rule is None else rule[1],
                output_type="pt",
            )
            steps += out.stats.steps
            row_steps += int(out.stats.row_steps.sum())
            accepted += int(out.stats.row_accepted.sum())
            widths += out.stats.draft_widths
            for d in made:
                kept += int(d.num_kept_drawn)
                coupled += int(d.num_coupled_drawn)
            made.clear()
        seconds = time.perf_counter() - start
    finally:
        jacobi.JacobiDrafter.__init__ = original
    return {
        "steps": steps,
        "accepted_per_step": accepted / max(row_steps, 1),
        "wall_s": seconds,
        "mean_width": sum(widths) / len(widths) if widths else 0.0,
        "kept_fraction": kept / coupled if coupled else None,
    }


def run_table(pipe, configs, labels, batch_size, guidance_scale, repeats) -> list[dict]:
    """Every configuration ``repeats`` times, round-robin (repeat r of every configuration, then r + 1),
    so that load changes on a shared machine hit all configurations alike; medians per configuration."""
    all_runs: list[list[dict]] = [[] for _ in configs]
    for _ in range(repeats):
        for runs, config in zip(all_runs, configs):
            runs.append(run_config(pipe, config, labels, batch_size, guidance_scale))
    rows = []
    for config, runs in zip(configs, all_runs):
        rows.append(
            {
                "name": config[0],
                "speculative": config[1],
                "speculative_options": config[2],
                "num_draft_tokens": config[3],
                "acceptance": None if config[4] is None else config[4][0],
                "acceptance_options": None if config[4] is None else config[4][1],
                "steps": statistics.median(r["steps"] for r in runs),
                "accepted_per_step": statistics.median(r["accepted_per_step"] for r in runs),
                "mean_width": statistics.median(r["mean_width"] for r in runs),
                "kept_fraction": runs[0]["kept_fraction"],
                "wall_s_median": statistics.median(r["wall_s"] for r in runs),
                "wall_s_all": [r["wall_s"] for r in runs],
            }
        )
        print(
            f"  {config[0]}: {rows[-1]['steps']} steps, {rows[-1]['accepted_per_step']:.2f} acc/step", file=sys.stderr
        )
    base = rows[0]["wall_s_median"]
    for row in rows:
        row["speedup"] = base / row["wall_s_median"]
    return rows


def markdown(rows: list[dict], sjd_ref: dict[str, float] | None = None) -> str:
    lines = [
        "| config | target forwards | accepted/step (w/o bonus) | × SJD accepted | kept guesses | mean width | wall s (median) | speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = (sjd_ref or {}).get(r["name"])
        kept = "" if r["kept_fraction"] is None else f"{r['kept_fraction']:.2f}"
        lines.append(
            f"| {r['name']} | {r['steps']:g} | {r['accepted_per_step']:.2f} | {'' if ref is None else f'{ref:.2f}x'} | "
            f"{kept} | {r['mean_width']:.1f} | {r['wall_s_median']:.2f} | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-images", type=int, default=32)
    p.add_argument("--num-draft-tokens", type=int, nargs="+", default=[8, 16])
    p.add_argument("--widths", type=int, nargs="+", default=[2, 4, 8, 12, 16])
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_default_llamagen()
    pipe.set_progress_bar_config(disable=True)
    labels = [i % pipe.target.config.num_classes for i in range(args.num_images)]
    run_config(
        pipe, ("warm-up", "mc-sjd", {}, 8, None), labels[: args.batch_size], args.batch_size, args.guidance_scale
    )
    record = {
        "environment": {
            "device": "cpu",
            "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python"] + sys.argv),
        },
        "setup": {
            "batch_size": args.batch_size,
            "num_images": args.num_images,
            "guidance_scale": args.guidance_scale,
            "temperature": 1.0,
            "top_k": None,
            "repeats": args.repeats,
            "seeds": "generator seeded by each batch's first index",
        },
        "coupling": {},
        "window": None,
    }
    for k in args.num_draft_tokens:
        print(f"coupling, k={k}", file=sys.stderr)
        record["coupling"][str(k)] = run_table(
            pipe, coupling_configs(k), labels, args.batch_size, args.guidance_scale, args.repeats
        )
    print("window", file=sys.stderr)
    record["window"] = run_table(
        pipe, window_configs(args.widths, max(args.widths)), labels, args.batch_size, args.guidance_scale, args.repeats
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    env = record["environment"]
    print(f"{env['processor']} ({env['device']}, {env['threads']} thread), torch {env['torch']}, {env['date']}")
    print(f"command: `{env['command']}`\n")
    for k, rows in record["coupling"].items():
        by = {r["name"]: r for r in rows}
        ref = {}
        for r in rows[1:]:
            sjd_name = "sjd k=" + r["name"].split(" k=")[1]
            ref[r["name"]] = r["accepted_per_step"] / max(by[sjd_name]["accepted_per_step"], 1e-9)
        print(f"### Couplings, {k} drafts per step\n\n{markdown(rows, ref)}\n")
    print(f"### Draft windows\n\n{markdown(record['window'])}\n")


if __name__ == "__main__":
    main()
