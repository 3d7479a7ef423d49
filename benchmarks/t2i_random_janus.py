"""Janus text-to-image on a small *random* Janus (transformers ``JanusForConditionalGeneration``, 64
image tokens): baseline vs SJD vs MC-SJD vs EAGLE (a head trained by ``mmspec train-drafter
--target-kind janus`` on the model's own greedy images), through ``mmspec bench --suite t2i``.

Random weights say little about acceptance on real images (no real Janus checkpoint is available
offline); the run shows the path end to end — folder, training, pipeline with its ``eagle/`` head, the
bench suite — and the per-step costs and steps on one model, same prompt and seed for every method.

    OMP_NUM_THREADS=1 python benchmarks/t2i_random_janus.py [OUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main(out: Path) -> None:
    from mmspec.app.cli import main as mmspec
    from mmspec.pipelines.t2i import JanusImagePipeline
    from mmspec.training.t2i import random_janus

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    model_dir, pipe_dir = out / "janus-random", out / "janus-random-eagle"
    # Llama 4 x 128, 8 x 8 = 64 image tokens over a 256-code VQ, sharper image-token logits than the init's.
    shape = dict(text_vocab=512, hidden_size=128, num_layers=4, image_tokens=64, codebook=256, embed_dim=8)
    random_janus(**shape, image_token_id=500, special_ids=(1, 0, 510), sharpness=4.0).save_pretrained(model_dir)
    prompts = out / "prompts.txt"
    prompts.write_text("\n".join(f"1 {a} {b} {c} 510" for a in range(2, 42, 3) for b in (5, 9) for c in (7, 11)) + "\n")
    train = ["train-drafter", "--target-kind", "janus", "--target-path", str(model_dir), "--output", str(out / "head")]
    train += ["--prompts", str(prompts), "--temperature", "0", "--guidance-scale", "3", "--steps", "300"]
    assert mmspec([*train, "--batch-size", "8", "--device", "cpu"]) == 0
    pipe = JanusImagePipeline.from_pretrained(model_dir).load_eagle_head(out / "head")
    pipe.save_pretrained(pipe_dir)
    configs = "sjd;mc-sjd;mc-sjd:coupling=gumbel;eagle:k=4;eagle:k=8"
    for batch, sampling in ((1, "temperature=0"), (8, "temperature=0"), (1, "temperature=1")):
        bench = ["bench", "--suite", "t2i", "--option", f"model={pipe_dir}", "--option", "input_ids=1 5 9 11 510"]
        bench += ["--option", "guidance_scale=3", "--option", sampling, "--option", f"configs={configs}"]
        record = out / f"bench-t2i-b{batch}-{sampling.replace('=', '')}.json"
        assert (
            mmspec([*bench, "--batch-size", str(batch), "--repeats", "5", "--output", str(record), "--device", "cpu"])
            == 0
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("results/t2i-random-janus"))
