"""Whole-row reads of ``[B, R, V]`` distributions on the CPU: ``gather`` with an index expanded over ``V``
against :func:`mmspec.kernels.rows.gather_rows` (``index_select`` on the flattened batch), and the Jacobi
draft's one-hot slots as a ``where`` against a one-hot tensor against a product and a scatter-add.

Each case is timed in a loop of its own (``time.thread_time``, median of ``--repeats`` blocks of
``--calls`` calls), on fresh random inputs of the shapes a speculative step reads (R = k + 1 = 9 rows,
S = 8 read). In the loop between two forwards the same ops run with cold caches, so their share of a
step is smaller than these ratios suggest (benchmarks/RESULTS.md, "Seventh stop"). Not a test.

    OMP_NUM_THREADS=1 python benchmarks/row_reads.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmspec.kernels.rows import gather_rows


def median_us(fn, calls: int, repeats: int) -> float:
    fn()
    blocks = []
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        blocks.append((time.thread_time() - start) / calls * 1e6)
    return statistics.median(blocks)


def cases(batch: int, vocab: int, generator: torch.Generator) -> dict:
    """name -> (before, after): the replaced read and its replacement on one step's shapes."""
    probs = torch.rand(batch, 9, vocab, generator=generator)  # [B, k + 1, V]
    index = torch.randint(0, 9, (batch, 8), generator=generator)  # [B, S]
    row = index[:, 0]  # [B]
    covered = torch.arange(8)[None].expand(batch, -1) < 5  # [B, S]
    fresh = torch.randint(0, vocab, (batch, 8), generator=generator)  # [B, S]
    window = probs[:, :8].contiguous()  # [B, S, V]
    return {
        "rows [B, S] of [B, R, V]": (
            lambda: probs.gather(1, index[..., None].expand(-1, -1, vocab)),
            lambda: gather_rows(probs, index),
        ),
        "one row [B] of [B, R, V]": (
            lambda: probs.gather(1, row[:, None, None].expand(-1, 1, vocab))[:, 0],
            lambda: gather_rows(probs, row),
        ),
        "one-hot slots of [B, S, V]": (
            lambda: torch.where(
                covered[..., None], window, torch.zeros(batch, 8, vocab).scatter_(-1, fresh[..., None], 1.0)
            ),
            lambda: (window * covered[..., None]).scatter_add_(
                -1, fresh[..., None], (~covered)[..., None].to(window.dtype)
            ),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--vocab", type=int, nargs="+", default=[512, 16384])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    print("B      V  case                                 before us  after us  ratio")
    for batch in args.batch:
        for vocab in args.vocab:
            for name, (before, after) in cases(batch, vocab, generator).items():
                assert torch.equal(before(), after())
                t_before = median_us(before, args.calls, args.repeats)
                t_after = median_us(after, args.calls, args.repeats)
                print(f"{batch:<2} {vocab:6d}  {name:34s} {t_before:10.1f} {t_after:9.1f} {t_before / t_after:6.1f}x")


if __name__ == "__main__":
    main()
