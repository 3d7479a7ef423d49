"""Per-step overhead of the causal loop's speculative paths on the embedded reference LlamaGen (issue #19).

For each method and batch size this measures, on the same seeded generations:

- **ratio** = wall time of the speculative steps ÷ wall time of the same steps' model forwards
  replayed alone (the target's verify forward, the draft model's forwards, the EAGLE head's forwards
  and LM-head calls, each with the arguments and cache lengths recorded during the step). A ratio of
  1.00 would mean the loop, the drafter and the rule cost nothing beyond the forwards.
- **aten ops / Python calls per step** (median over steps) in the step and in its forwards alone:
  ``TorchDispatchMode`` counts every aten op, ``sys.setprofile`` every Python function call.

Times are this thread's CPU time (``time.thread_time``: on the shared 2-core machine, time spent
descheduled is not the code's cost). Step ``s`` runs from the end of the loop's callback ``s - 1`` to
the start of callback ``s`` (draft, verify, commit, stats and the loop's one host sync); the first step
(it includes the prefill) is left out. The callback replays the step's recorded forwards at once, so
step and forwards are timed under the same load; recording adds one Python wrapper call and one
copy of the cache lengths per forward to the step. The ratio is total step time ÷ total forward time
per generation, the median over the generations (``--repeats`` or ``--seeds``; min and max in the JSON). Not a test:
timings are noisy.

    OMP_NUM_THREADS=1 python benchmarks/step_overhead.py --batch 1 16 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mmspec.app.defaults import load_default_llamagen
from mmspec.loops import required_cache_len, speculative_generate
from mmspec.pipelines.llamagen.modeling_gpt import LlamaGenCondition
from mmspec.sampling import SamplingConfig


@dataclass
class Call:
    """One recorded model call: the function, its arguments and its cache's lengths before it."""

    fn: Callable
    args: tuple
    cache: object
    lengths: torch.Tensor | None


@dataclass
class Recorder:
    """Wraps model entry points (instance attributes) and files every call of the current step.
    Arguments are kept by reference (the loop builds them anew every step and never writes them);
    the cache's lengths are copied, one small op per call."""

    calls: list[Call] = field(default_factory=list)
    patched: list[tuple[object, str]] = field(default_factory=list)

    def wrap(self, obj: object, name: str, cache_of: Callable[[tuple], object]) -> None:
        original = getattr(obj, name)

        def recorded(*args):
            cache = cache_of(args)
            self.calls.append(Call(original, args, cache, None if cache is None else cache.lengths.clone()))
            return original(*args)

        setattr(obj, name, recorded)
        self.patched.append((obj, name))

    def take(self) -> list[Call]:
        calls, self.calls = self.calls, []
        return calls

    def unwrap(self) -> None:
        for obj, name in self.patched:
            delattr(obj, name)  # back to the class's method
        self.patched.clear()


def clock() -> float:
    """This thread's CPU time: on a shared machine, time spent descheduled is not the code's cost."""
    return time.thread_time()


@torch.inference_mode()  # as the loop runs them (its callback, which replays them, runs outside)
def replay(calls: list[Call]) -> None:
    """Run one step's recorded model calls alone, each at its recorded cache lengths, then put the
    lengths back. The same inputs over the same cache prefix write the same keys and values again,
    so the generation goes on unchanged."""
    after = {id(c.cache): (c.cache, c.cache.lengths.clone()) for c in calls if c.cache is not None}
    for call in calls:
        if call.cache is not None:
            call.cache.lengths.copy_(call.lengths)
        call.fn(*call.args)
    for cache, lengths in after.values():
        cache.lengths.copy_(lengths)


class count_ops(TorchDispatchMode):
    """Counts aten ops dispatched while active; ``read()`` returns the count since the last read."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))

    def read(self) -> int:
        n, self.count = self.count, 0
        return n


class count_python_calls:
    """Counts Python function calls while active (``sys.setprofile``); ``read()`` as :class:`count_ops`."""

    def __init__(self) -> None:
        self.count = 0

    def _profile(self, frame, event, arg) -> None:
        if event == "call":
            self.count += 1

    def __enter__(self):
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(None)

    def read(self) -> int:
        n, self.count = self.count, 0
        return n


def setup(pipe, method: str, batch: int, k: int, guidance: float):
    """The target, condition, sampling, drafter and rule of one configuration."""
    sampling = SamplingConfig(temperature=1.0, guidance_scale=guidance)
    spec = pipe.resolve_speculation(None if method == "baseline" else method)
    condition = LlamaGenCondition(class_labels=torch.arange(batch) % pipe.target.config.num_classes)
    return spec, condition, sampling


def generate(pipe, spec, condition, sampling, k: int, seed: int, callback) -> None:
    target = pipe.target
    window = 1 if spec.drafter is None else spec.drafter.verify_width(k)
    cache = target.new_cache(
        condition.batch_size, required_cache_len(target.config.cls_token_num, target.config.block_size, window), True
    )
    speculative_generate(
        target,
        condition,
        cache,
        max_new_tokens=target.config.block_size,
        drafter=spec.drafter,
        acceptance=spec.rule,
        num_draft_tokens=k,
        sampling=sampling,
        generator=torch.Generator().manual_seed(seed),
        callback=callback,
    )
    return cache


def instrument(recorder: Recorder, pipe, spec) -> None:
    """Record the forwards of the target and of the method's drafter."""
    recorder.wrap(pipe.target, "forward", lambda args: args[2])
    drafter = getattr(spec.drafter, "drafter", spec.drafter)  # an adaptive window wraps the drafter
    if drafter is None:
        return
    if hasattr(drafter, "head"):  # EAGLE: head forward (cache = args[3]) and the shared LM head
        recorder.wrap(drafter.head, "forward", lambda args: args[3])
        recorder.wrap(drafter.head, "logits", lambda args: None)
    elif hasattr(drafter, "model"):  # draft model
        recorder.wrap(drafter.model, "forward", lambda args: args[2])


def measure(pipe, method: str, batch: int, k: int, guidance: float, seeds: list[int]) -> dict:
    spec, condition, sampling = setup(pipe, method, batch, k, guidance)
    result = {"method": method, "batch": batch}
    step_times, replay_times, ratios = [], [], []
    recorder = Recorder()
    instrument(recorder, pipe, spec)
    try:
        for seed in seeds:
            steps, alone, started = [], [], [None]

            def on_step(*args, steps=steps, alone=alone, started=started):
                # Each step is timed from the end of the previous callback to the start of this one;
                # its forwards are replayed right here, so both see the same machine load.
                end = clock()
                calls = recorder.take()
                if started[0] is not None:  # step 0 includes the prefill
                    steps.append(end - started[0])
                    t0 = clock()
                    replay(calls)
                    alone.append(clock() - t0)
                started[0] = clock()

            generate(pipe, spec, condition, sampling, k, seed, on_step)
            step_times += steps
            replay_times += alone
            ratios.append(sum(steps) / sum(alone))
    finally:
        recorder.unwrap()
    result["steps_per_image"] = len(step_times) / len(seeds) + 1
    result["step_ms"] = 1e3 * statistics.median(step_times)
    result["forwards_ms"] = 1e3 * statistics.median(replay_times)
    result["ratio"] = statistics.median(ratios)
    result["ratio_min"], result["ratio_max"] = min(ratios), max(ratios)

    # Op counts and Python-call counts per step, each in one more generation (counted apart: the
    # dispatch mode's own Python calls must not count as calls of the code under test). Steps are
    # counted without the recorder; the forwards alone in a recording run, during their replays.
    for key, counter in (("ops", count_ops), ("py_calls", count_python_calls)):
        per_step, alone = [], []
        with counter() as tally:
            generate(pipe, spec, condition, sampling, k, 0, lambda *a, tally=tally, n=per_step: n.append(tally.read()))
        instrument(recorder, pipe, spec)
        try:

            def on_step(*args, alone=alone, counter=counter):
                calls = recorder.take()
                with counter() as tally:
                    replay(calls)
                alone.append(tally.read())

            generate(pipe, spec, condition, sampling, k, 0, on_step)
        finally:
            recorder.unwrap()
        result[f"step_{key}"] = statistics.median(per_step[1:])
        result[f"forward_{key}"] = statistics.median(alone[1:])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="baseline,sjd,draft-model,eagle")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--k", type=int, default=8, help="num_draft_tokens")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=5, help="timed generations per configuration (seeds 0, 1, ...)")
    parser.add_argument("--seeds", type=int, nargs="+", help="the timed generations' seeds instead of --repeats")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_default_llamagen()
    rows = []
    header = (
        f"{'method':<12} {'B':>3} {'steps':>6} {'step ms':>8} {'fwd ms':>8} {'ratio':>6} "
        f"{'ops/step':>9} {'ops fwd':>8} {'py/step':>8} {'py fwd':>7}"
    )
    print(header)
    for batch in args.batch:
        for method in args.methods.split(","):
            row = measure(pipe, method, batch, args.k, args.guidance, args.seeds or list(range(args.repeats)))
            rows.append(row)
            print(
                f"{method:<12} {batch:>3} {row['steps_per_image']:>6.1f} {row['step_ms']:>8.2f} "
                f"{row['forwards_ms']:>8.2f} {row['ratio']:>6.2f} {row['step_ops']:>9.0f} {row['forward_ops']:>8.0f} "
                f"{row['step_py_calls']:>8.0f} {row['forward_py_calls']:>7.0f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "k": args.k, "guidance": args.guidance, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
