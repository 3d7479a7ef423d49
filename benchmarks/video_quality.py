"""Quality of each model of a video pair alone, per denoising steps and guidance (the embedded pair's
MODEL_CARD.md, "Measured quality").

Usage: ``python benchmarks/video_quality.py [--model DIR] [--num-videos 64] t:16:3 d:2:3 ...``

Each configuration is ``WHO:STEPS:GUIDANCE`` with ``WHO`` = ``t`` (target-only) or ``d`` (the drafter
generates the whole video: ``speculative="draft-only"``, ``forced_target_blocks=0``). Every
configuration generates the same class labels (``i % num_classes``) and seeds (from 0, batches of 8)
and reports the ``classifier`` frame score of the prompt's class (mean over frames; mean of each
block's worst frame; share of frames the classifier gives p > 1/2) and the frame FID (embedded
LlamaGen VQ-encoder features) against 256 real held-out clips.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from mmspec.app.defaults import load_default_llamagen
from mmspec.app.evaluation import VQEncoderFeatures, frechet_distance
from mmspec.app.models import build_scorer, load_video
from mmspec.app.video_eval import VideoRun, frame_features, generate_all
from mmspec.data.emoji_video import EmojiClipConfig, render_clips
from mmspec.pipelines.video.scorers import aggregate_frame_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a VideoPipeline folder (default: the embedded pair)")
    parser.add_argument("--num-videos", type=int, default=64)
    parser.add_argument("configs", nargs="+", help="WHO:STEPS:GUIDANCE, WHO = t (target) or d (draft)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_video(args.model, "cpu")
    pipe.set_progress_bar_config(disable=True)
    scorer = build_scorer("classifier", {}, "cpu")
    features = VQEncoderFeatures(load_default_llamagen("cpu").vq)
    real = render_clips(EmojiClipConfig(num_clips=256, seed=1_000_003))[0].float() / 255.0
    real_features = frame_features(features, real)
    labels = [i % pipe.target.config.num_classes for i in range(args.num_videos)]
    prompts = [pipe.class_names[i] for i in labels]
    fpb = pipe.target.config.frames_per_block
    for config in args.configs:
        who, steps, guidance = config.split(":")
        if who not in ("t", "d"):
            raise SystemExit(f"error: {config}: WHO must be t or d")
        run = VideoRun("target-only")
        if who == "d":
            run = VideoRun("draft", "draft-only", {}, {"forced_target_blocks": 0, "draft_steps": int(steps)})
        call = {"num_inference_steps": int(steps), "guidance_scale": float(guidance)}
        out = generate_all(pipe, run, labels, 0, 8, call)
        scores = scorer.score(prompts, out["frames"])  # [N, F]
        worst = aggregate_frame_scores(scores.reshape(-1, fpb), "min").mean()
        fid = frechet_distance(frame_features(features, out["frames"]), real_features)
        print(
            f"{'target' if who == 't' else 'draft'} steps {steps} guidance {guidance}: classifier mean "
            f"{scores.mean():.3f}, block worst frame {worst:.3f}, recognised {(scores > math.log(0.5)).float().mean():.2f}, "
            f"FID vs real {fid:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
