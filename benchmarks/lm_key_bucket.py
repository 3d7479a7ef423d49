"""One decode step of a real causal LM with attention over the whole static cache vs over its filled
slots rounded up to ``KEY_BUCKET`` (``StaticKVCache.limit_keys``), next to transformers' own forward
with a ``DynamicCache`` of the same filled length (one CPU thread; not a test).

For each (cache size, filled length): the median of ``--repeats`` interleaved timings of mmspec's
``LMTarget.forward`` on one token without a key bound, with it, and transformers' model forward.

    OMP_NUM_THREADS=1 python benchmarks/lm_key_bucket.py /tmp/smol/cache/smollm2-135m-instruct --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import DynamicCache

from mmspec.pipelines.lm import load_lm
from mmspec.pipelines.vlm.decoder import KEY_BUCKET


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a local transformers causal-LM folder")
    parser.add_argument("--sizes", default="256:100,1024:100,1024:900,2048:100,2048:1000", help="S:filled,...")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    hf, target = load_lm(args.model)
    rows = []
    print(f"{'S':>5} {'filled':>6} {'whole ms':>9} {'bounded ms':>11} {'transformers ms':>16}")
    for item in args.sizes.split(","):
        size, filled = (int(x) for x in item.split(":"))
        cache = target.new_cache(1, size)
        prompt = torch.randint(100, 1000, (1, filled), generator=torch.Generator().manual_seed(0))
        positions = torch.arange(filled)[None]
        target.forward(prompt, positions, cache)
        cache.commit(torch.tensor([filled]))
        token, position = torch.tensor([[42]]), torch.tensor([[filled]])
        hf_cache = DynamicCache(config=hf.config)
        hf(prompt, cache=hf_cache, use_cache=True)
        times = {"whole": [], "bounded": [], "transformers": []}
        for _ in range(args.repeats):
            for name in times:
                start = time.perf_counter()
                if name == "transformers":
                    hf(token, cache=hf_cache, use_cache=True, logits_to_keep=1)
                    hf_cache.crop(-1)  # back to the filled length
                else:
                    cache.limit_keys(filled + 1 if name == "bounded" else None)
                    target.forward(token, position, cache)
                times[name].append(time.perf_counter() - start)
        row = {"size": size, "filled": filled, "key_bucket": KEY_BUCKET}
        row.update({f"{name}_ms": 1e3 * statistics.median(t) for name, t in times.items()})
        rows.append(row)
        print(
            f"{size:>5} {filled:>6} {row['whole_ms']:>9.1f} {row['bounded_ms']:>11.1f} {row['transformers_ms']:>16.1f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
