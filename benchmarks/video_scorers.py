"""Frame scorers for SDVG's router on real images (benchmarks/RESULTS.md, "Video frame scorers").

Usage: ``python benchmarks/video_scorers.py [--num-scenes 512] [--output JSON]``

On emoji scenes the embedded captioner never saw (its data configuration, dataset seed 4242, spread
over its 128 classes), the ``"vlm"`` scorer (embedded captioner): (1) the true caption against
another scene's caption, (2) the true caption as the frames degrade (Gaussian pixel noise of
growing standard deviation; box blur), which is what a router's threshold has to separate, and
(3) its cost per frame (median of repeats). One torch thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from mmspec.app.defaults import default_captioner_path
from mmspec.pipelines.video.scorers import get_frame_scorer
from mmspec.training.captioner_data import CaptionDataConfig


def unseen_scenes(num_scenes: int) -> tuple[torch.Tensor, list[str]]:
    """``[N, 3, H, W]`` scenes in [0, 1] and their captions."""
    settings = json.loads((default_captioner_path() / "recipe.json").read_text())["config"]["data"]
    dataset = CaptionDataConfig(**{**settings, "seed": 4242, "num_samples": num_scenes}).dataset()
    items = [dataset[i] for i in range(num_scenes)]
    images = [torch.from_numpy(np.array(item["image"].convert("RGB"))).permute(2, 0, 1) for item in items]
    return torch.stack(images).float() / 255, [item["caption"] for item in items]


def per_frame_ms(scorer, prompts: list[str], frames: torch.Tensor, repeats: int) -> float:
    """Median over ``repeats`` of the wall time of one ``score`` call, per frame, in ms."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        scorer.score(prompts, frames)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times) / (frames.shape[0] * frames.shape[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-scenes", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    images, captions = unseen_scenes(args.num_scenes)
    scorer = get_frame_scorer("vlm", path=default_captioner_path(), batch_size=64)
    frames = images[:, None]  # [N, 1, 3, H, W]: every scene a one-frame video
    true = scorer.score(captions, frames)[:, 0]
    wrong_captions = [captions[(i + 7) % len(captions)] for i in range(len(captions))]
    same = torch.tensor([w == c for w, c in zip(wrong_captions, captions)])
    wrong = scorer.score(wrong_captions, frames)[:, 0]
    results = {
        "num_scenes": args.num_scenes,
        "vlm": {
            "true_caption_mean": float(true.mean()),
            "true_caption_median": float(true.median()),
            "true_caption_p10": float(true.quantile(0.1)),
            "true_caption_min": float(true.min()),
            "other_caption_mean": float(wrong[~same].mean()),
            "true_beats_other": float((true > wrong)[~same].float().mean()),
        },
    }
    g = torch.Generator().manual_seed(0)
    degraded = {}
    for sigma in (0.05, 0.1, 0.2, 0.4):
        noisy = (images + sigma * torch.randn(images.shape, generator=g)).clamp(0, 1)
        degraded[f"noise {sigma}"] = float(scorer.score(captions, noisy[:, None]).mean())
    for k in (3, 5):
        blurred = torch.nn.functional.avg_pool2d(images, k, stride=1, padding=k // 2, count_include_pad=False)
        degraded[f"box blur {k}x{k}"] = float(scorer.score(captions, blurred[:, None]).mean())
    results["vlm"]["true_caption_mean_degraded"] = degraded
    video = images[:64].reshape(4, 16, *images.shape[1:])  # 4 videos of 16 frames
    results["vlm"]["ms_per_frame_batch64"] = per_frame_ms(scorer, captions[:4], video, args.repeats)
    text = json.dumps(results, indent=1)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
