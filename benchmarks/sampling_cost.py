"""Cost of one ``sample_from_probs`` call: exponential race vs inverse CDF, per shape (one CPU thread).

The two exact samplers :func:`mmspec.sampling.sample_from_probs` chooses between by size: the race
``argmax(probs / E)`` draws ``V`` Exp(1) numbers per row, the inverse CDF one uniform per row but runs
more ops. Shapes: one LlamaGen row (512 codes), a batch of 16 rows, a Jacobi window of 8 at batch 1
and 16, and one row of SmolLM2's 49,152 ids. Best of 5 timings of ``n`` calls each. Not a test.

    OMP_NUM_THREADS=1 python benchmarks/sampling_cost.py --json results/sampling-cost-cpu.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mmspec.kernels.rejection import inverse_cdf_sample

SHAPES = [(1, 512), (2, 512), (4, 512), (16, 512), (1, 8, 512), (16, 8, 512), (1, 49152)]


def best_us(fn, n: int) -> float:
    for _ in range(10):
        fn()
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        timings.append((time.perf_counter() - start) / n * 1e6)
    return min(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'shape':>14} {'elements':>9} {'race us':>8} {'inverse CDF us':>15}")
    for shape in SHAPES:
        probs = torch.softmax(torch.randn(*shape, generator=g), -1)
        n = 30 if probs.numel() > 100_000 else 300

        def race(probs=probs):
            return (probs / torch.empty_like(probs).exponential_(1.0, generator=g)).argmax(-1)

        def inverse_cdf(probs=probs):
            return inverse_cdf_sample(probs, torch.rand(probs.shape[:-1], generator=g))

        row = {"shape": list(shape), "elements": probs.numel(), "race_us": best_us(race, n)}
        row["inverse_cdf_us"] = best_us(inverse_cdf, n)
        rows.append(row)
        print(f"{str(shape):>14} {row['elements']:>9} {row['race_us']:>8.1f} {row['inverse_cdf_us']:>15.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
