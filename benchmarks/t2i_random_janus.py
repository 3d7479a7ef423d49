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


def random_janus(seed: int = 0):
    """A random Janus: Llama 4 x 128, 8 x 8 = 64 image tokens over a 256-code VQ."""
    from transformers import GenerationConfig, JanusConfig, JanusForConditionalGeneration

    config = JanusConfig(
        text_config=dict(
            model_type="llama",
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        ),
        vision_config=dict(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=128,
            num_image_tokens=64,
            mlp_ratio=2.0,
            depth=1,
        ),
        vq_config=dict(
            embed_dim=8,
            num_embeddings=256,
            latent_channels=32,
            base_channels=32,
            channel_multiplier=[1, 2],
            num_res_blocks=1,
            projection_dim=128,
            image_token_embed_dim=128,
            num_hidden_layers=1,
        ),
        image_token_id=500,
    )
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config).eval()
    with torch.no_grad():  # sharper image-token logits than the init's near-uniform ones
        model.model.generation_head.vision_head.weight.mul_(4.0)
    model.generation_config = GenerationConfig(bos_token_id=1, pad_token_id=0, generation_kwargs={"boi_token_id": 510})
    return model


def main(out: Path) -> None:
    from mmspec.app.cli import main as mmspec
    from mmspec.pipelines.t2i import JanusImagePipeline

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    model_dir, pipe_dir = out / "janus-random", out / "janus-random-eagle"
    random_janus().save_pretrained(model_dir)
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
