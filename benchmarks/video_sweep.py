"""SDVG τ sweep on the embedded video pair (benchmarks/RESULTS.md, "SDVG τ sweep").

Usage: ``python benchmarks/video_sweep.py [--scorer classifier] [--steps 8] [--draft-steps 2]
[--num-videos 32] [--percentiles 5,10,25,50] [--output DIR] [--write-calibration MODEL_DIR]``

1. Calibration (SDVG's recipe, ``calibrate_tau``): target-only videos on calibration seeds (disjoint
   from the evaluation seeds); every block after the first is scored by the frame scorer (default
   ``classifier``, the embedded frame classifier; ``vlm``: the embedded captioner) and aggregated by
   its worst frame; τ = a percentile of those block scores.
2. Evaluation (:func:`mmspec.app.video_eval.evaluate_video`): target-only, draft-only and SDVG at each
   τ on the same labels and seeds: target / draft forwards, wall time, speed-up vs target-only in the
   same run, the scorer's mean and worst-frame score, frame FID (embedded LlamaGen VQ encoder
   features) vs target-only frames and vs real held-out clips.
3. A table (stdout, ``sweep.md``), ``sweep.json`` and the quality-vs-speed plot ``sweep.png``.
``--write-calibration`` stores the τ of ``--default-percentile`` as ``sdvg.json`` in a model folder,
with the scorer, aggregate and step counts it was calibrated with (the CLI's defaults for that folder).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from mmspec.app.defaults import load_default_llamagen
from mmspec.app.evaluation import VQEncoderFeatures
from mmspec.app.models import SDVG_FILE, build_scorer, load_video
from mmspec.app.video_eval import VideoRun, evaluate_video, format_video_report, generate_all, score_videos
from mmspec.app.video_io import tau_sweep_plot
from mmspec.data.emoji_video import EmojiClipConfig, render_clips
from mmspec.pipelines.video.scorers import aggregate_frame_scores, calibrate_tau


def block_scores(scores: torch.Tensor, frames_per_block: int, aggregate: str) -> torch.Tensor:
    """``[N, F]`` frame scores -> every block's aggregate after the first (the blocks SDVG drafts)."""
    n, f = scores.shape
    blocks = scores.reshape(n * f // frames_per_block, frames_per_block)
    return aggregate_frame_scores(blocks, aggregate).reshape(n, -1)[:, 1:].flatten()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a VideoPipeline folder (default: the embedded pair)")
    parser.add_argument("--num-videos", type=int, default=32)
    parser.add_argument("--num-calibration", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1, help="1: the router's savings are per video")
    parser.add_argument("--scorer", default="classifier", help="frame scorer (its embedded weights)")
    parser.add_argument("--steps", type=int, default=4, help="the target's denoising steps per block")
    parser.add_argument("--draft-steps", type=int, default=None, help="the drafter's (default: --steps)")
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--percentiles", default="5,10,25,50,75")
    parser.add_argument("--default-percentile", type=float, default=10.0)
    parser.add_argument("--aggregate", default="min")
    parser.add_argument("--repeats", type=int, default=3, help="wall time: median of this many identical runs")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/video-sweep"))
    parser.add_argument("--write-calibration", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_video(Path(args.model) if args.model else None, "cpu")
    pipe.set_progress_bar_config(disable=True)
    scorer = build_scorer(args.scorer, {}, "cpu")
    pipe.set_scorer(scorer)
    classes = pipe.target.config.num_classes
    call = {"num_inference_steps": args.steps, "guidance_scale": args.guidance_scale}
    fpb = pipe.target.config.frames_per_block

    # 1. calibration on seeds disjoint from the evaluation's (10_000 + ...)
    labels = [i % classes for i in range(args.num_calibration)]
    calib = generate_all(pipe, VideoRun("target-only"), labels, 10_000, args.batch_size, call)
    scores = block_scores(
        score_videos(scorer, [pipe.class_names[i] for i in labels], calib["frames"]), fpb, args.aggregate
    )
    percentiles = [float(p) for p in args.percentiles.split(",")]
    taus = {p: calibrate_tau(scores, p) for p in sorted({*percentiles, args.default_percentile})}

    # 2. evaluation
    drafting = {"draft_steps": args.draft_steps} if args.draft_steps is not None else {}
    runs = [VideoRun("sdvg tau=+inf", "sdvg", {"tau": math.inf, "aggregate": args.aggregate}, drafting)]
    runs += [
        VideoRun(f"sdvg p{p:g} tau={t:.4g}", "sdvg", {"tau": t, "aggregate": args.aggregate}, drafting)
        for p, t in taus.items()
        if p in percentiles
    ]
    clips = EmojiClipConfig(
        image_size=pipe.vae.config.image_size,
        num_frames=pipe.target.config.max_frames,
        num_classes=classes,
        num_clips=max(args.num_videos, 64),
        seed=1_000_003,
    )
    real = render_clips(clips)[0].float() / 255.0
    features = VQEncoderFeatures(load_default_llamagen("cpu").vq)
    eval_labels = [i % classes for i in range(args.num_videos)]
    start = time.time()
    report = evaluate_video(
        pipe,
        runs,
        eval_labels,
        seed=0,
        batch_size=args.batch_size,
        call=call,
        scorer=scorer,
        features=features,
        real_frames=real,
        aggregate=args.aggregate,
        repeats=args.repeats,
        draft_options=drafting,
    )
    report["calibration"] = {
        "num_videos": args.num_calibration,
        "seeds_from": 10_000,
        "block_scores": {"mean": float(scores.mean()), "min": float(scores.min()), "max": float(scores.max())},
        "taus": {str(p): t for p, t in taus.items()},
    }
    report["draft_steps"] = args.draft_steps if args.draft_steps is not None else args.steps
    report["environment"] = {
        "device": f"CPU ({platform.processor() or platform.machine()}), 1 torch thread",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start)),
    }
    for row in report["rows"]:
        row.pop("frames")

    # 3. outputs
    args.output.mkdir(parents=True, exist_ok=True)
    table = format_video_report(report)
    (args.output / "sweep.md").write_text(table + "\n")
    (args.output / "sweep.json").write_text(json.dumps(report, indent=1) + "\n")
    points = []
    for row in report["rows"]:
        tau = {"target-only": math.inf, "draft-only": -math.inf}.get(row["name"], row["acceptance_options"].get("tau"))
        if row["name"] == "sdvg tau=+inf":
            continue  # the same video as target-only (checked below), slower by the drafting
        points.append(
            {
                "tau": tau,
                "speedup": row["speedup_vs_target_only"],
                "quality_mean": row["score_mean"],
                "quality_worst": row["score_worst_frame"],
            }
        )
    tau_sweep_plot(
        points, args.output / "sweep.png", quality_label=f"{args.scorer} score ({scorer.measures.split(' (')[0]})"
    )
    print(table)
    if args.write_calibration is not None:
        record = {
            "scorer": args.scorer,
            "aggregate": args.aggregate,
            "tau": taus[args.default_percentile],
            "percentile": args.default_percentile,
            "num_inference_steps": args.steps,
            "draft_steps": args.draft_steps if args.draft_steps is not None else args.steps,
            "guidance_scale": args.guidance_scale,
            "calibrated_on": f"{args.num_calibration} target-only videos, seeds 10000.., "
            f"{args.steps} steps, guidance {args.guidance_scale}",
        }
        (args.write_calibration / SDVG_FILE).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.write_calibration / SDVG_FILE}")


if __name__ == "__main__":
    main()
