"""``mmspec bench``: baseline and speculative configurations on the same inputs, in one process.

A suite builds a target, inputs and a list of named configurations; :func:`run_benchmark` runs
each (warm-up, then ``repeats`` timed runs and one profiled run for the draft/verify/other
split) and writes one JSON record with the device, versions, command, steps, accepted length with
and without the bonus token, wall times and the speedup against the baseline *of the same run*.
Suites register themselves in :data:`BENCH_SUITES` (:mod:`mmspec.app.bench_llamagen` adds LlamaGen's).
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..loops import GenerationOutput
from ..methods import MethodRegistry


@dataclass
class BenchCase:
    """One configuration: ``run(generator) -> GenerationOutput`` plus a description of it."""

    name: str
    run: Callable[[torch.Generator, bool], GenerationOutput]  # (generator, profile) -> output
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchSuite:
    """What a suite hands to :func:`run_benchmark`: the baseline first, then the methods."""

    name: str
    description: str
    cases: list[BenchCase]
    setup: dict[str, Any] = field(default_factory=dict)


BENCH_SUITES: dict[str, Callable[..., BenchSuite]] = {}
#: Modules that register suites when imported (one per pipeline family, beside this one).
SUITE_MODULES = ("mmspec.app.bench_llamagen", "mmspec.app.bench_mar", "mmspec.app.bench_t2i", "mmspec.app.bench_video")


def load_suites() -> dict[str, Callable[..., BenchSuite]]:
    """Import every suite module and return the registry."""
    import importlib

    for module in SUITE_MODULES:
        importlib.import_module(module)
    return BENCH_SUITES


def register_suite(name: str):
    """Decorator: make a suite factory ``f(device, dtype, batch_size, **options) -> BenchSuite`` available."""

    def wrap(factory):
        BENCH_SUITES[name] = factory
        return factory

    return wrap


def method_specs(
    pipe: Any, configs: str | None, num_draft_tokens: int, rule: Any = None
) -> list[tuple[str, str | None, dict, int]]:
    """A pipeline suite's configurations ``(name, method, speculative_options, num_draft_tokens)``, the
    baseline first: every registered method ``pipe`` has the components for (and whose loop takes
    ``rule``, when one is given), or ``configs``: ``;``-separated ``METHOD[:key=value,...]`` with the
    method's options and ``k=`` for ``num_draft_tokens``, e.g. ``"sjd;mc-sjd:coupling=gumbel,k=16"``."""
    from .jobs import parse_key_values

    if configs is None:
        specs = [
            (name, name, {}, num_draft_tokens)
            for name in pipe.methods.available(pipe)
            if rule is None or pipe.methods.get(name).accepts(rule)
        ]
    else:
        specs = []
        for spec in [c for c in configs.split(";") if c]:
            method, _, opts = spec.partition(":")
            options = parse_key_values([p for p in opts.split(",") if p], f"config {spec!r}")
            pipe.methods.get(method)  # a clear error for an unknown method, before anything runs
            specs.append((spec, method, options, int(options.pop("k", num_draft_tokens))))
    return [("baseline", None, {}, num_draft_tokens)] + specs


def environment(device: torch.device) -> dict[str, Any]:
    """Device name and library versions for the record."""
    import diffusers
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "device": str(device),
        "device_name": name,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "diffusers": diffusers.__version__,
        "mmspec": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["mmspec"] + sys.argv[1:]) if Path(sys.argv[0]).name == "mmspec" else " ".join(sys.argv),
    }


def _timed(case: BenchCase, seed: int, device: torch.device, profile: bool) -> tuple[GenerationOutput, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # deliberate: wall time of a whole call
    start = time.perf_counter()
    out = case.run(torch.Generator(device).manual_seed(seed), profile)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def run_benchmark(
    suite: BenchSuite, device: torch.device, repeats: int = 3, warmup: int = 1, seed: int = 0
) -> dict[str, Any]:
    """Run every case of ``suite`` on the same seed and inputs; return the JSON-ready record."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    results = []
    baseline_tokens = None
    baseline_time = None
    for case in tqdm(suite.cases, desc=f"bench {suite.name}", unit="config"):
        for _ in range(warmup):
            _timed(case, seed, device, profile=False)
        times = []
        for _ in range(repeats):
            out, seconds = _timed(case, seed, device, profile=False)
            times.append(seconds)
        profiled, _ = _timed(case, seed, device, profile=True)
        wall = statistics.median(times)
        if baseline_tokens is None:
            baseline_tokens, baseline_time = out.tokens, wall
        generated = int(out.lengths.sum())
        summary = profiled.stats.summary()
        results.append(
            {
                "name": case.name,
                "config": case.config,
                "steps": out.stats.steps,
                "prefill_steps": out.stats.prefill_steps,
                "generated_tokens": generated,
                "mean_accepted_without_bonus": out.stats.mean_accepted,
                "mean_tokens_per_step_with_bonus": out.stats.mean_tokens_per_step,
                "acceptance_rate_at_depth": summary["acceptance_rate_at_depth"],
                "acceptance_rate": out.stats.draft_acceptance_rate,
                "mean_draft_width": summary.get("mean_draft_width"),
                "wall_time_s_median": wall,
                "wall_time_s_all": times,
                "tokens_per_s": generated / wall,
                "profiled_draft_s": summary["draft_time_s"],
                "profiled_verify_s": summary["verify_time_s"],
                "profiled_other_s": summary["other_time_s"],
                "speedup_vs_baseline": baseline_time / wall,
                "tokens_equal_baseline": bool(
                    out.tokens.shape == baseline_tokens.shape and torch.equal(out.tokens, baseline_tokens)
                ),
                "stats_summary": summary,
            }
        )
    return {
        "suite": suite.name,
        "description": suite.description,
        "environment": environment(device),
        "setup": suite.setup,
        "repeats": repeats,
        "warmup": warmup,
        "seed": seed,
        "baseline": suite.cases[0].name,
        "results": results,
    }


def format_table(record: dict[str, Any]) -> str:
    """A Markdown table of a record (for terminals and benchmarks/RESULTS.md)."""
    env = record["environment"]
    lines = [
        f"suite `{record['suite']}` on {env['device_name']} ({env['device']}), torch {env['torch']}, {env['date']}",
        f"command: `{env['command']}`",
        "",
        "| config | steps | accepted/step (w/o bonus) | tokens/step (with bonus) | wall s (median) | tokens/s | speedup | = baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in record["results"]:
        lines.append(
            f"| {r['name']} | {r['steps']} | {r['mean_accepted_without_bonus']:.2f} | "
            f"{r['mean_tokens_per_step_with_bonus']:.2f} | {r['wall_time_s_median']:.3f} | {r['tokens_per_s']:.1f} | "
            f"{r['speedup_vs_baseline']:.2f}x | {'yes' if r['tokens_equal_baseline'] else 'no'} |"
        )
    return "\n".join(lines)


def write_record(record: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


#: The drafting methods of the ``lm`` suite's bare language model (no pipeline around it): each gets
#: the suite's ``(target, draft, vocab_size)`` and its options; the suite runs every one by default.
LM_METHODS = MethodRegistry("lm suite")


@LM_METHODS.register("ngram")
def _lm_ngram(models: dict, options: dict) -> Any:
    """Prompt lookup: n-grams of the prompt and output propose the continuation (training-free)."""
    from ..drafters import NGramDrafter

    return NGramDrafter(models["vocab_size"])


@LM_METHODS.register("draft-model", options={"alternatives": 1})
def _lm_draft_model(models: dict, options: dict) -> Any:
    """The small random draft LM (``alternatives`` > 1: that many sibling tokens per depth, a tree)."""
    from ..drafters import ModelDrafter

    return ModelDrafter(models["draft"], num_alternatives=options["alternatives"])


@LM_METHODS.register("self-draft")
def _lm_self_draft(models: dict, options: dict) -> Any:
    """The target drafts for itself: every draft is accepted (the acceptance upper bound)."""
    from ..drafters import ModelDrafter

    return ModelDrafter(models["target"])


@register_suite("lm")
def lm_suite(
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 1,
    *,
    dim: int = 256,
    n_layer: int = 4,
    draft_dim: int = 64,
    vocab_size: int = 512,
    prompt_len: int = 64,
    max_new_tokens: int = 128,
    num_draft_tokens: int = 4,
    temperature: float = 0.0,
    configs: str | None = None,
) -> BenchSuite:
    """A Llama-architecture target with random weights: measures the loop's per-step costs and the
    drafters' overheads (every method of :data:`LM_METHODS`; random weights: acceptance is not
    meaningful except for self-drafting, an upper bound). Prompts repeat a random 16-token phrase so
    n-gram lookup has something to find. ``configs``: instead of every method with its defaults,
    these configurations, ``;``-separated, each ``METHOD[:key=value,...]``, e.g.
    ``"ngram;draft-model:alternatives=3"``."""
    from ..loops import required_cache_len, speculative_generate
    from ..modeling import DecoderConfig, DecoderLM
    from ..sampling import SamplingConfig
    from ..types import TokenPrompt

    gen = torch.Generator().manual_seed(1234)
    target = (
        DecoderLM(DecoderConfig(vocab_size=vocab_size, dim=dim, n_layer=n_layer, n_head=max(dim // 64, 1)))
        .to(device, dtype)
        .eval()
    )
    draft = (
        DecoderLM(DecoderConfig(vocab_size=vocab_size, dim=draft_dim, n_layer=1, n_head=max(draft_dim // 32, 1)))
        .to(device, dtype)
        .eval()
    )
    phrase = torch.randint(0, vocab_size, (batch_size, 16), generator=gen)
    prompt = TokenPrompt(
        phrase.repeat(1, (prompt_len + 15) // 16)[:, :prompt_len].to(device),
        torch.full((batch_size,), prompt_len, device=device),
    )
    sampling = SamplingConfig(temperature=temperature)

    def case(name, drafter, window):
        def run(generator, profile):
            with torch.inference_mode():
                cache = target.new_cache(batch_size, required_cache_len(prompt_len, max_new_tokens, window))
                return speculative_generate(
                    target,
                    prompt,
                    cache,
                    max_new_tokens=max_new_tokens,
                    drafter=drafter,
                    num_draft_tokens=num_draft_tokens,
                    sampling=sampling,
                    generator=generator,
                    profile=profile,
                )

        return BenchCase(name, run, {"drafter": name, "num_draft_tokens": 0 if drafter is None else num_draft_tokens})

    from .jobs import parse_key_values

    models = {"target": target, "draft": draft, "vocab_size": vocab_size}
    specs = [c for c in configs.split(";") if c] if configs is not None else LM_METHODS.names()
    cases = [case("baseline (static cache, eager)", None, 1)]
    for spec in specs:
        name, _, opts = spec.partition(":")
        method = LM_METHODS.get(name)
        options = method.resolve_options(parse_key_values([o for o in opts.split(",") if o], f"config {spec!r}"))
        drafter = method.build(models, options)
        cases.append(case(spec, drafter, drafter.verify_width(num_draft_tokens)))
    return BenchSuite(
        name="lm",
        description=lm_suite.__doc__.split("\n")[0],
        cases=cases,
        setup={
            "target": asdict(target.config),
            "draft": asdict(draft.config),
            "dtype": str(dtype),
            "batch_size": batch_size,
            "prompt_len": prompt_len,
            "max_new_tokens": max_new_tokens,
            "sampling": asdict(sampling),
        },
    )
