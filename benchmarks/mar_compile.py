"""Eager vs ``torch.compile`` for MAR's per-AR-step work (the MAE pass + the diffusion head's S
steps) on the CPU: what ``MARPipeline.enable_compile`` compiles, on a model of the embedded pair's
target size (or a saved MARModel folder). Prints the median per-AR-step time of each and the
compile time. Run from /tmp with OMP_NUM_THREADS=1.

    python benchmarks/mar_compile.py [--batch-size 1] [--repeats 5] [--model DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmspec.pipelines.mar import MARModel

#: The embedded pair's target (mmspec/assets/mar-emoji/target/config.json) sizes.
TARGET_SIZES = dict(
    img_size=32, vae_stride=4, patch_size=1, encoder_embed_dim=128, encoder_depth=2, encoder_num_heads=4,
    decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, vae_embed_dim=8, class_num=32, buffer_size=8,
    diffloss_d=3, diffloss_w=128, num_sampling_steps="50",
)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default=None, help="a saved MARModel folder (default: random, TARGET_SIZES)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = (MARModel.from_pretrained(args.model) if args.model else MARModel(**TARGET_SIZES)).float().eval()
    b, length, channels = args.batch_size, model.seq_len, model.token_embed_dim
    tokens, unknown = torch.randn(b, length, channels), torch.rand(b, length) > 0.5
    labels = torch.arange(b) % model.config.class_num
    steps = model.schedule.num_steps

    def ar_step(n: int) -> None:  # one guided AR step predicting n tokens per row
        z = model(tokens, unknown, labels, cfg=True)
        cond, null = z[:b, :n].reshape(-1, z.shape[-1]), z[b:, :n].reshape(-1, z.shape[-1])
        model.sample_head(cond, null, 3.0, 1.0, torch.randn(b * n, channels), torch.randn(steps, b * n, channels))

    def median_step_s() -> float:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for n in (4, 8):
                ar_step(n)
            times.append((time.perf_counter() - start) / 2)
        return statistics.median(times)

    with torch.no_grad():
        ar_step(4), ar_step(8)
        eager = median_step_s()
        start = time.perf_counter()
        model.compile(fullgraph=True, dynamic=False)  # as MARPipeline.enable_compile on the CPU
        model.diffloss.compile(fullgraph=True, dynamic=True)
        ar_step(4), ar_step(8)
        compile_s = time.perf_counter() - start
        compiled = median_step_s()
    print(f"batch {b}: eager {eager * 1e3:.1f} ms / AR step, compiled {compiled * 1e3:.1f} ms "
          f"({compiled / eager:.2f}x eager), compile + first calls {compile_s:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
