"""Quality next to speed for the video pipeline (``mmspec eval --model video`` and the τ sweep of
``benchmarks/video_sweep.py``): every method on the same class labels and seeds as target-only,
with wall time, model forwards, block acceptance, the frame scorer's mean and worst-frame score,
and a frame-level FID (offline features) against target-only frames and, for emoji models, real
held-out clips.

Quality relative to the two single-model modes: ``retained`` = (q − q_draft) / (q_target − q_draft)
— the share of the target's advantage over draft-only that a method keeps (1 = target-only quality,
0 = draft-only quality; undefined when the two are equal).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..routers import aggregate_scores
from .evaluation import frechet_distance


@dataclass(frozen=True)
class VideoRun:
    """One configuration: ``name``, and the pipeline's ``speculative`` / ``acceptance_options`` /
    ``speculative_options`` (None: target-only)."""

    name: str
    speculative: str | None = None
    acceptance_options: dict = field(default_factory=dict)
    speculative_options: dict = field(default_factory=dict)

    def call_kwargs(self) -> dict:
        return {
            "speculative": self.speculative,
            "acceptance_options": dict(self.acceptance_options) or None,
            "speculative_options": dict(self.speculative_options) or None,
        }


@torch.no_grad()
def generate_all(pipe: Any, run: VideoRun, labels: list[int], seed: int, batch_size: int, call: dict) -> dict:
    """Every video of ``run`` (batch ``b`` seeded ``seed + first index``): frames ``[N, F, 3, H, W]``,
    wall seconds, forwards, the loop's time split (draft / decode / score / target) and per-block
    sources / scores."""
    frames, sources, scores = [], [], []
    seconds, target_forwards, draft_forwards = 0.0, 0, 0
    split = {"draft": 0.0, "decode": 0.0, "score": 0.0, "target": 0.0}  # the block loop's time split
    for first in range(0, len(labels), batch_size):
        start = time.perf_counter()
        out = pipe(
            class_labels=labels[first : first + batch_size],
            generator=torch.Generator().manual_seed(seed + first),
            output_type="pt",
            **call,
            **run.call_kwargs(),
        )
        seconds += time.perf_counter() - start
        frames.append(out.frames)
        sources.append(out.stats.token_source)
        scores.append(out.stats.scores)
        target_forwards += out.stats.target_forwards
        draft_forwards += out.stats.draft_forwards
        split["draft"] += out.stats.draft_time
        split["decode"] += out.stats.decode_time
        split["score"] += out.stats.route_time - out.stats.decode_time
        split["target"] += out.stats.verify_time
    return {
        "time_split_s": split,
        "frames": torch.cat(frames),
        "seconds": seconds,
        "target_forwards": target_forwards,
        "draft_forwards": draft_forwards,
        "sources": torch.cat(sources),
        "block_scores": torch.cat(scores),
    }


@torch.no_grad()
def score_videos(scorer: Any, prompts: list[str], frames: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """The scorer's ``[N, F]`` frame scores of ``frames [N, F, 3, H, W]`` against ``prompts``."""
    return torch.cat(
        [
            scorer.score(prompts[i : i + batch_size], frames[i : i + batch_size]).float().cpu()
            for i in range(0, frames.shape[0], batch_size)
        ]
    )


@torch.no_grad()
def frame_features(features: Any, frames: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Features ``[N * F, D]`` of every frame (``features``: images ``[n, 3, H, W]`` in [0, 1] -> ``[n, D]``)."""
    flat = frames.flatten(0, 1)
    return torch.cat([features(flat[i : i + batch_size]).float().cpu() for i in range(0, flat.shape[0], batch_size)])


def retained(value: float, target: float, draft: float) -> float | None:
    """(value − draft) / (target − draft), or None when target and draft score the same."""
    gap = target - draft
    return None if abs(gap) < 1e-12 else (value - draft) / gap


def evaluate_video(
    pipe: Any,
    runs: list[VideoRun],
    labels: list[int],
    *,
    seed: int,
    batch_size: int,
    call: dict,
    scorer: Any,
    features: Any,
    real_frames: torch.Tensor | None = None,  # [M, F, 3, H, W] in [0, 1]
    aggregate: str = "min",
    repeats: int = 1,
    draft_options: dict | None = None,
) -> dict:
    """Run target-only, draft-only (when the pipeline has a drafter; ``draft_options`` are its
    ``speculative_options``, e.g. ``draft_steps``) and ``runs`` on the same labels and seeds; return
    the report (one row per configuration, target-only first). ``repeats``: after
    the quality pass, every configuration is timed this many more times, round robin (so that load
    drifting on a shared machine hits all of them alike); its wall time is the median."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    configs = [VideoRun("target-only")]
    if pipe.drafter is not None:
        configs.append(VideoRun("draft-only", "draft-only", speculative_options=dict(draft_options or {})))
    configs += runs
    prompts = [pipe.class_names[i] for i in labels]
    real = frame_features(features, real_frames) if real_frames is not None else None
    rows, reference = [], None
    for run in configs:
        out = generate_all(pipe, run, labels, seed, batch_size, call)
        frame_scores = score_videos(scorer, prompts, out["frames"])  # [N, F]
        feats = frame_features(features, out["frames"])
        if reference is None:
            reference = {"features": feats, "target_forwards": out["target_forwards"]}
        drafted = (out["sources"] == 1) | (out["sources"] == 2)  # accepted | recovered
        rows.append(
            {
                "name": run.name,
                "speculative": run.speculative,
                "acceptance_options": dict(run.acceptance_options),
                "speculative_options": dict(run.speculative_options),
                "target_forwards": out["target_forwards"],
                "draft_forwards": out["draft_forwards"],
                "target_forward_ratio": out["target_forwards"] / max(reference["target_forwards"], 1),
                "time_split_s": out["time_split_s"],
                "blocks_kept": int((out["sources"] == 1).sum()),
                "blocks_drafted": int(drafted.sum()),
                "score_mean": float(frame_scores.mean()),
                "score_worst_frame": float(aggregate_scores(frame_scores, aggregate).mean()),
                "fid_vs_target_only": frechet_distance(feats, reference["features"]),
                "fid_vs_real": frechet_distance(feats, real) if real is not None else None,
                "frames": out["frames"],
            }
        )
    times = [[] for _ in configs]
    for _ in range(repeats):
        for i, run in enumerate(configs):
            times[i].append(generate_all(pipe, run, labels, seed, batch_size, call)["seconds"])
    for row, samples in zip(rows, times):
        row["wall_s"], row["wall_s_all"] = statistics.median(samples), samples
        row["speedup_vs_target_only"] = statistics.median(times[0]) / row["wall_s"]
    by_name = {row["name"]: row for row in rows}
    target, draft = by_name["target-only"], by_name.get("draft-only")
    for row in rows:
        for key in ("score_mean", "score_worst_frame"):
            row[f"{key}_delta"] = row[key] - target[key]
            row[f"{key}_retained"] = None if draft is None else retained(row[key], target[key], draft[key])
    return {
        "num_videos": len(labels),
        "seed": seed,
        "call": call,
        "scorer": getattr(scorer, "name", type(scorer).__name__),
        "features": getattr(features, "name", type(features).__name__),
        "rows": rows,
    }


def format_video_report(report: dict) -> str:
    """A Markdown table of :func:`evaluate_video`'s rows."""

    def num(value, digits=3):
        return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

    lines = [
        f"{report['num_videos']} videos per configuration, scorer `{report['scorer']}`, FID features "
        f"`{report['features']}`",
        "",
        "| config | target fwd | draft fwd | kept / drafted | wall s | draft / decode / score / target s | speedup "
        "| score mean (Δ) | worst frame (Δ) | worst retained | FID vs target-only | FID vs real |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        split = " / ".join(f"{r['time_split_s'][k]:.2f}" for k in ("draft", "decode", "score", "target"))
        lines.append(
            f"| {r['name']} | {r['target_forwards']} | {r['draft_forwards']} | {r['blocks_kept']}/{r['blocks_drafted']} "
            f"| {r['wall_s']:.2f} | {split} | {r['speedup_vs_target_only']:.2f}x | {num(r['score_mean'])} "
            f"({num(r['score_mean_delta'])}) | {num(r['score_worst_frame'])} ({num(r['score_worst_frame_delta'])}) "
            f"| {num(r['score_worst_frame_retained'], 2)} | {num(r['fid_vs_target_only'], 2)} | {num(r['fid_vs_real'], 2)} |"
        )
    return "\n".join(lines)
