"""One linear layer on the CPU: ``F.linear`` (MKL) against a oneDNN-packed weight
(:class:`mmspec.cpu_linear.PackedLinear`), per number of rows, for the weight shapes of SmolLM2-135M
and of the embedded reference LlamaGen. Microseconds per call, this thread's CPU time, the best of
``--repeats`` runs of ``--calls`` calls. With ``--lm PATH`` (a transformers causal-LM folder), also one
verify forward of that model over ``T`` tokens after a 100-token prompt, unpacked and packed
(:meth:`~mmspec.pipelines.base.SpeculativePipelineMixin.enable_cpu_packing`'s rule), timed in turn,
median of ``--forwards`` timings each. Not a test: timings are noisy.

    OMP_NUM_THREADS=1 python benchmarks/cpu_linear.py --json benchmarks/results/cpu-linear-cpu.json \
        --lm /path/to/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from mmspec.cpu_linear import PackedLinear, cpu_packing_available, pack_linear_layers

#: (model, in_features, out_features)
SHAPES = [
    ("SmolLM2-135M attention (q/k/v/o)", 576, 576),
    ("SmolLM2-135M MLP up / gate", 576, 1536),
    ("SmolLM2-135M MLP down", 1536, 576),
    ("reference LlamaGen qkv", 192, 576),
    ("reference LlamaGen MLP up / gate", 192, 512),
]
ROWS = [1, 2, 5, 9, 18]


def per_call_us(fn, calls: int, repeats: int) -> float:
    for _ in range(max(calls // 10, 5)):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time() - start) / calls * 1e6)
    return best


def verify_forwards(path: str, tokens: list[int], forwards: int) -> list[dict]:
    """Median ms of one target forward over ``T`` new tokens (for ``T`` in ``tokens``) after a 100-token
    prompt, by two targets over the same weights, one of them packed, timed in turn; the same cache
    slots every time (written, never committed)."""
    from mmspec.pipelines.lm import LMTarget, load_lm

    hf, plain = load_lm(path, dtype=torch.float32)
    packed = LMTarget.from_hf(hf)
    pack_linear_layers(packed)
    prompt = 100
    ids = torch.randint(0, plain.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    caches = {}
    for target in (plain, packed):
        cache = caches[id(target)] = target.new_cache(1, prompt + max(tokens) + 1)
        target.decoder.features(target.decoder.tok_embeddings(ids), torch.arange(prompt)[None], cache)
        cache.commit(torch.tensor([prompt]))
    rows = []
    for count in tokens:
        x = torch.randint(0, plain.vocab_size, (1, count), generator=torch.Generator().manual_seed(count))
        times = {id(plain): [], id(packed): []}
        for i in range(2 * forwards + 4):
            target = packed if i % 2 else plain
            cache = caches[id(target)]
            start = time.thread_time()
            target.forward(x, cache.slots(count), cache, None)
            if i >= 4:  # two warm-up forwards each
                times[id(target)].append((time.thread_time() - start) * 1e3)
        mkl, one = statistics.median(times[id(plain)]), statistics.median(times[id(packed)])
        rows.append({"tokens": count, "mkl_ms": mkl, "packed_ms": one})
        print(f"verify forward, {count} tokens: {mkl:.1f} ms MKL, {one:.1f} ms packed", flush=True)
    return rows


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lm", help="a transformers causal-LM folder: also time its verify forwards")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 5, 9], help="verify widths for --lm")
    parser.add_argument("--forwards", type=int, default=15, help="timed forwards per width and variant for --lm")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if not cpu_packing_available():
        raise SystemExit("this torch build has no oneDNN linear ops")
    torch.set_num_threads(1)
    rows_out = []
    print(f"{'shape':<36} {'rows':>4} {'MKL us':>8} {'packed us':>9} {'packed/MKL':>10}")
    for name, fan_in, fan_out in SHAPES:
        torch.manual_seed(0)
        linear = nn.Linear(fan_in, fan_out, bias=False)
        packed = PackedLinear(linear)
        for rows in ROWS:
            x = torch.randn(rows, fan_in)
            mkl = per_call_us(lambda: F.linear(x, linear.weight), args.calls, args.repeats)  # noqa: B023
            if rows == 1:  # PackedLinear sends one row to F.linear: time the packed kernel itself
                w = packed.packed_weight
                one = per_call_us(
                    lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),  # noqa: B023
                    args.calls,
                    args.repeats,
                )
            else:
                one = per_call_us(lambda: packed(x), args.calls, args.repeats)  # noqa: B023
            rows_out.append(
                {"shape": name, "in": fan_in, "out": fan_out, "rows": rows, "mkl_us": mkl, "packed_us": one}
            )
            print(f"{name:<36} {rows:>4} {mkl:>8.1f} {one:>9.1f} {one / mkl:>10.2f}", flush=True)
    forwards = verify_forwards(args.lm, args.tokens, args.forwards) if args.lm else None
    if args.json:
        with open(args.json, "w") as f:
            record = {"torch": torch.__version__, "rows": rows_out, "lm": args.lm, "verify_forwards": forwards}
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
