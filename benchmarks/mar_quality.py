"""Is the MAR target better than its draft? FID to real held-out scenes of each model's own baseline
samples (no speculation), next to the noise floor of real scenes against real scenes.

Both models sample the same classes (0-31 cycled) with the same seeds, ``num_iter`` AR steps, linear
guidance, temperature 1; features are the offline extractor of ``mmspec eval`` (the embedded LlamaGen
VQ encoder's feature statistics: not Inception FID, comparable only within this table). The real
sets are the 256 held-out scenes and 256 training scenes (the floor). Run from /tmp:

    OMP_NUM_THREADS=1 python benchmarks/mar_quality.py --num-images 128 --output quality.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mmspec.app.defaults import load_default_llamagen, load_default_mar, load_mar_folder
from mmspec.app.evaluation import VQEncoderFeatures, frechet_distance
from mmspec.pipelines.mar import MARPipeline
from mmspec.training.reference_data import EmojiDataConfig, render_images


@torch.no_grad()
def sample(pipe: MARPipeline, labels: list[int], batch_size: int, num_iter: int, guidance: float) -> torch.Tensor:
    """``[N, 3, H, W]`` images in [0, 1]; batch ``b`` seeded by its first index."""
    images = []
    for start in range(0, len(labels), batch_size):
        out = pipe(
            class_labels=labels[start : start + batch_size],
            num_iter=num_iter,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(start),
            output_type="pt",
        )
        images.append(out.images.float())
    return torch.cat(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a MARPipeline folder (default: the embedded pair)")
    parser.add_argument("--num-images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-iter", type=int, default=16)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_default_mar() if args.model is None else load_mar_folder(args.model)
    features = VQEncoderFeatures(load_default_llamagen().vq)
    data = EmojiDataConfig()
    heldout = render_images(data, heldout=True)[0].float() / 255
    train = render_images(data)[0][: heldout.shape[0]].float() / 255
    real = features(heldout)
    labels = [i % data.num_classes for i in range(args.num_images)]
    results = {"real (training scenes) vs held-out: noise floor": frechet_distance(features(train), real)}
    seconds = {}
    for name, model in (("target", pipe.target), ("draft", pipe.drafter)):
        start = time.perf_counter()
        alone = MARPipeline(target=model, vae=pipe.vae)
        alone.set_progress_bar_config(disable=True)
        images = sample(alone, labels, args.batch_size, args.num_iter, args.guidance)
        seconds[name] = time.perf_counter() - start
        results[f"{name} samples vs held-out"] = frechet_distance(features(images), real)
    for key, value in results.items():
        print(f"{key}: FID {value:.3f}")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    if args.output:
        record = {
            "fid": results,
            "seconds": seconds,
            **vars(args),
            "model": str(args.model),
            "output": str(args.output),
        }
        args.output.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
