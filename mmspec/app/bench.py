"""``mmspec bench``: baseline and speculative configurations on the same inputs, in one process.

A suite builds a target, inputs and a list of named configurations; :func:`run_benchmark` runs
each (warm-up, then ``repeats`` timed runs and one profiled run for the draft/verify/other
split) and writes one JSON record with the device, versions, command, steps, accepted length with
and without the bonus token, wall times and the speedup against the baseline *of the same run*.
Suites register themselves in :data:`BENCH_SUITES` (:mod:`mmspec.app.bench_llamagen` adds LlamaGen's,
:mod:`mmspec.app.bench_text` the ``lm`` and ``vlm`` suites). Cases may be *peers* -- another library's
implementation on the same inputs (transformers ``generate``, prompt lookup, assisted generation) --
whose outputs are checked token for token against the baseline like every other case. Repeats run in
interleaved rounds (every case once per round), and within a round part by part when a suite's inputs
come in parts (prompts, images, batches of class labels: part 0 of every case, then part 1, ...), so
a shared machine's drifting load hits all cases alike. :func:`write_plots` draws speedup against
accepted length and the step-time breakdown.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import __version__


@dataclass
class PeerOutput:
    """What a peer implementation (another library's ``generate``) returns: ``tokens`` ``[B, N]`` and
    ``lengths`` ``[B]`` like :class:`~mmspec.loops.GenerationOutput`, without mmspec's statistics."""

    tokens: torch.Tensor
    lengths: torch.Tensor


@dataclass
class BenchCase:
    """One configuration: ``run(generator, profile, part)`` returns its output for part ``part`` of the
    suite's inputs (:attr:`BenchSuite.parts`) -- a :class:`~mmspec.loops.GenerationOutput` /
    :class:`PeerOutput`, or a list of them -- plus a description of it. One timed run calls it for
    every part in order with one generator. ``peer``: another library's implementation (no steps or
    phase times). ``compare_to``: the name of a peer case this one is compared with
    (``speedup_vs_peer`` in the record)."""

    name: str
    run: Callable[[torch.Generator, bool, int], Any]  # (generator, profile, part) -> output(s)
    config: dict[str, Any] = field(default_factory=dict)
    peer: bool = False
    compare_to: str | None = None


@dataclass
class BenchSuite:
    """What a suite hands to :func:`run_benchmark`: the baseline first, then the methods. ``setup``: the
    settings for the record, with ``"model"``, what the suite runs (a folder, or a description of an
    embedded or random-weight model), which :func:`format_table` heads the table with."""

    name: str
    description: str
    cases: list[BenchCase]
    setup: dict[str, Any] = field(default_factory=dict)
    #: How many parts the inputs come in (one call of a case each: a prompt, an image, a batch of class
    #: labels); rounds interleave the cases part by part.
    parts: int = 1


BENCH_SUITES: dict[str, Callable[..., BenchSuite]] = {}
#: Modules that register suites when imported (one per pipeline family, beside this one).
SUITE_MODULES = (
    "mmspec.app.bench_llamagen",
    "mmspec.app.bench_mar",
    "mmspec.app.bench_t2i",
    "mmspec.app.bench_text",
    "mmspec.app.bench_video",
)


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


def require_folder(setting: str, value: str) -> Path:
    """The suite setting ``setting`` (a model or image folder) as an existing folder, before anything
    loads; a ValueError naming it otherwise (the loaders would take a missing path for a Hugging Face
    hub id and say only that it is not a valid one)."""
    path = Path(value)
    if not path.is_dir():
        raise ValueError(f"--option {setting}={value}: {'a file, not a' if path.exists() else 'no such'} folder")
    return path


#: What each annotated type of a suite setting accepts from ``--option`` (values are parsed as JSON):
#: (description, check, conversion).
_OPTION_TYPES: dict[type, tuple[str, Callable[[Any], bool], Callable[[Any], Any]]] = {
    bool: ("true or false", lambda v: isinstance(v, bool), bool),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool), int),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), float),
    # a number given to a text setting (taus=-3.5, prompt=42) means its text
    str: ("text", lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool), str),
}


def typed_options(factory: Callable[..., BenchSuite], options: dict[str, Any]) -> dict[str, Any]:
    """``--option`` values (parsed as JSON) checked against the annotated types of the suite ``factory``'s
    settings and converted to them (``temperature=0`` -> ``0.0``); a ValueError naming the setting for a
    value of another type (``temperature=hot``, ``peers=maybe``), before the suite loads anything.
    ``null`` is accepted where the setting may be None."""
    import typing

    hints = typing.get_type_hints(factory)
    typed = {}
    for name, value in options.items():
        kinds = typing.get_args(hints[name]) or (hints[name],)  # ``int | None`` -> (int, NoneType)
        optional = type(None) in kinds
        if value is None and optional:
            typed[name] = None
            continue
        (kind,) = [k for k in kinds if k is not type(None)]
        what, check, convert = _OPTION_TYPES[kind]
        if not check(value):
            raise ValueError(f"--option {name}: must be {what}{' or null' if optional else ''}, got {value!r}")
        typed[name] = convert(value)
    return typed


def parse_configs(registry: Any, configs: str, num_draft_tokens: int) -> list[tuple[str, str, dict, int]]:
    """A suite's ``configs`` setting -- ``;``-separated ``METHOD[:key=value,...]`` with the method's options
    and ``k=`` for ``num_draft_tokens``, e.g. ``"sjd;mc-sjd:coupling=gumbel,k=16"`` -- as
    ``(name, method, speculative_options, num_draft_tokens)``. Method and option names are checked
    against the pipeline class's method ``registry`` (:meth:`~mmspec.methods.Method.resolve_options`)
    and ``k`` must be >= 1: a ValueError before any model loads."""
    from ..pipelines.validation import check_int
    from .jobs import parse_key_values

    specs = []
    for spec in [c for c in configs.split(";") if c]:
        method, _, opts = spec.partition(":")
        options = parse_key_values([p for p in opts.split(",") if p], f"config {spec!r}")
        k = check_int(f"config {spec!r}: k", options.pop("k", num_draft_tokens), 1)
        registry.get(method).resolve_options(options)
        specs.append((spec, method, options, k))
    return specs


def method_specs(
    pipe: Any, configured: list[tuple[str, str, dict, int]] | None, num_draft_tokens: int, rule: Any = None
) -> list[tuple[str, str | None, dict, int]]:
    """A pipeline suite's configurations ``(name, method, speculative_options, num_draft_tokens)``, the
    baseline first: ``configured`` (from :func:`parse_configs`), or every registered method ``pipe`` has
    the components for (and whose loop takes ``rule``, when one is given). Each is built once with
    ``pipe.resolve_speculation`` (components, option values, the rule's commit mode), so that a
    configuration that cannot run is a ValueError before the first case runs."""
    if configured is None:
        configured = [
            (name, name, {}, num_draft_tokens)
            for name in pipe.methods.available(pipe)
            if rule is None or pipe.methods.get(name).accepts(rule)
        ]
    for _, method, options, _ in configured:
        pipe.resolve_speculation(method, options or None, rule)
    return [("baseline", None, {}, num_draft_tokens)] + configured


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


@dataclass
class RoundTimes:
    """One run of each case of a round: its outputs, wall seconds and this process's CPU seconds (all
    threads; on a shared machine CPU time leaves out the time the process waited for a core, wall time
    does not), each keyed by case name."""

    outputs: dict[str, list]
    wall: dict[str, float]
    cpu: dict[str, float]


def _round(
    cases: list[BenchCase], parts: int, seed: int, device: torch.device, profile: bool, progress: tqdm
) -> RoundTimes:
    """Run every case once over all ``parts`` of the inputs, interleaved part by part (part 0 of every
    case, then part 1, ...), so that load drifting during the round hits every case alike. Each case
    keeps its own generator, seeded with ``seed``, through its parts: its random stream is that of a run
    on its own."""
    generators = {case.name: torch.Generator(device).manual_seed(seed) for case in cases}
    times = RoundTimes({c.name: [] for c in cases}, dict.fromkeys(generators, 0.0), dict.fromkeys(generators, 0.0))
    for part in range(parts):
        for case in cases:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # deliberate: wall time of a whole call
            start, cpu_start = time.perf_counter(), time.process_time()
            out = case.run(generators[case.name], profile, part)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.wall[case.name] += time.perf_counter() - start
            times.cpu[case.name] += time.process_time() - cpu_start
            times.outputs[case.name] += out if isinstance(out, list) else [out]
            progress.update()
    return times


def _rows(outs: list) -> list[list[int]]:
    """Every output row's generated ids, cut to its length (what equality is checked on)."""
    return [row[:n] for out in outs for row, n in zip(out.tokens.tolist(), out.lengths.tolist())]


def _stats_fields(outs: list, profiled: list) -> dict[str, Any]:
    """Steps, accepted lengths and phase times summed over the calls of one case (None for peers)."""
    stats = [o.stats for o in outs if getattr(o, "stats", None) is not None]
    if not stats:
        keys = ("steps", "prefill_steps", "mean_accepted_without_bonus", "mean_tokens_per_step_with_bonus")
        keys += ("acceptance_rate_at_depth", "acceptance_rate", "mean_draft_width", "profiled_draft_s")
        keys += ("profiled_verify_s",)
        return dict.fromkeys(keys + ("profiled_accept_s", "profiled_other_s", "stats_summary"))
    row_steps = sum(float(s.row_steps.sum()) for s in stats)
    accepted = sum(float(s.row_accepted.sum()) for s in stats)
    reached = [sum(vals) for vals in zip(*(s.proposed_at_depth.tolist() for s in stats))]
    kept = [sum(vals) for vals in zip(*(s.accepted_at_depth.tolist() for s in stats))]
    widths = [w for s in stats for w in s.draft_widths]
    summaries = [o.stats.summary() for o in profiled]
    phase = {key: sum(x[key + "_time_s"] or 0.0 for x in summaries) for key in ("draft", "verify", "accept", "other")}
    return {
        "steps": sum(s.steps for s in stats),
        "prefill_steps": sum(s.prefill_steps for s in stats),
        "mean_accepted_without_bonus": accepted / max(row_steps, 1.0),
        "mean_tokens_per_step_with_bonus": accepted / max(row_steps, 1.0) + 1.0,
        "acceptance_rate_at_depth": [k / r if r else 0.0 for k, r in zip(kept, reached)],
        # kept / proposed drafts over all depths (CSpD's acceptance rate); None without drafts
        "acceptance_rate": sum(kept) / sum(reached) if sum(reached) else None,
        "mean_draft_width": sum(widths) / len(widths) if widths else None,
        **{f"profiled_{key}_s": value for key, value in phase.items()},
        "stats_summary": summaries[0] if len(summaries) == 1 else summaries,
    }


def run_benchmark(
    suite: BenchSuite, device: torch.device, repeats: int = 3, warmup: int = 1, seed: int = 0
) -> dict[str, Any]:
    """Run every case of ``suite`` on the same seed and inputs; return the JSON-ready record.

    Warm-up rounds first (``warmup``), then ``repeats`` rounds that time every case once each (part by
    part: :func:`_round`), then one profiled round of the mmspec cases for the draft / verify / accept /
    other split."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    from ..pipelines.validation import check_int

    check_int("a suite's parts", suite.parts, 1)
    names = [case.name for case in suite.cases]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # cases are keyed by name: two of a name would share a generator and outputs
        raise ValueError(f"configurations named twice: {', '.join(repeated)}")
    for case in suite.cases:
        if case.compare_to is not None and case.compare_to not in names:
            raise ValueError(f"case {case.name!r} compares to {case.compare_to!r}, which is not in the suite")
    ours = [case for case in suite.cases if not case.peer]
    calls = suite.parts * (len(suite.cases) * (warmup + repeats) + len(ours))
    progress = tqdm(total=calls, desc=f"bench {suite.name}", unit="call")
    for _ in range(warmup):
        _round(suite.cases, suite.parts, seed, device, False, progress)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu_times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        timed = _round(suite.cases, suite.parts, seed, device, False, progress)
        for name in names:
            times[name].append(timed.wall[name])
            cpu_times[name].append(timed.cpu[name])
    outputs = timed.outputs
    profiled = {name: [] for name in names} | _round(ours, suite.parts, seed, device, True, progress).outputs
    progress.close()
    wall = {name: statistics.median(t) for name, t in times.items()}
    cpu = {name: statistics.median(t) for name, t in cpu_times.items()}
    baseline = names[0]
    baseline_rows = _rows(outputs[baseline])
    results = []
    for case in suite.cases:
        outs = outputs[case.name]
        generated = sum(int(o.lengths.sum()) for o in outs)
        result = {
            "name": case.name,
            "config": case.config,
            "peer": case.peer,
            "generated_tokens": generated,
            "wall_time_s_median": wall[case.name],
            "wall_time_s_all": times[case.name],
            "wall_time_s_min": min(times[case.name]),  # least disturbed by a shared machine's load
            "cpu_time_s_median": cpu[case.name],
            "cpu_time_s_all": cpu_times[case.name],
            "tokens_per_s": generated / wall[case.name],
            "speedup_vs_baseline": wall[baseline] / wall[case.name],
            "speedup_vs_baseline_cpu": cpu[baseline] / cpu[case.name],
            "tokens_equal_baseline": _rows(outs) == baseline_rows,
            **_stats_fields(outs, profiled[case.name]),
        }
        if case.compare_to is not None:
            result["compare_to"] = case.compare_to
            result["speedup_vs_peer"] = wall[case.compare_to] / wall[case.name]
            result["speedup_vs_peer_cpu"] = cpu[case.compare_to] / cpu[case.name]
            result["tokens_equal_peer"] = _rows(outs) == _rows(outputs[case.compare_to])
        results.append(result)
    return {
        "suite": suite.name,
        "description": suite.description,
        "environment": environment(device),
        "setup": suite.setup,
        "repeats": repeats,
        "warmup": warmup,
        "parts": suite.parts,
        "seed": seed,
        "baseline": baseline,
        "results": results,
    }


def format_table(record: dict[str, Any]) -> str:
    """A Markdown table of a record (for terminals and benchmarks/RESULTS.md), headed by the suite, the
    model it ran (``setup["model"]``, which every suite records), the device and the command."""
    env = record["environment"]
    lines = [
        f"suite `{record['suite']}`, model: {record['setup']['model']}; on {env['device_name']} ({env['device']}), "
        f"torch {env['torch']}, {env['date']}",
        f"command: `{env['command']}`",
        "",
        "| config | steps | accepted/step (w/o bonus) | tokens/step (with bonus) | wall s (median) | wall s (min) | "
        "CPU s (median) | tokens/s | speedup (wall / CPU) | vs peer (wall / CPU) | = baseline |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    for r in record["results"]:
        peer = "-"
        if r.get("compare_to"):
            peer = f"{r['speedup_vs_peer']:.2f}x / {r['speedup_vs_peer_cpu']:.2f}x {r['compare_to']}"
        lines.append(
            f"| {r['name']} | {num(r['steps'], 'd')} | {num(r['mean_accepted_without_bonus'], '.2f')} | "
            f"{num(r['mean_tokens_per_step_with_bonus'], '.2f')} | {r['wall_time_s_median']:.3f} | "
            f"{r['wall_time_s_min']:.3f} | {r['cpu_time_s_median']:.3f} | "
            f"{r['tokens_per_s']:.1f} | {r['speedup_vs_baseline']:.2f}x / {r['speedup_vs_baseline_cpu']:.2f}x | {peer} | "
            f"{'yes' if r['tokens_equal_baseline'] else 'no'} |"
        )
    if (record.get("setup") or {}).get("temperature", 0) > 0:
        lines += [
            "",
            "Sampled (temperature > 0): '= baseline' compares draws, and a lossless method keeps the baseline's "
            "distribution, not its draws (its own random stream), so 'no' is expected for it.",
        ]
    return "\n".join(lines)


def write_record(record: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


#: Phases of a profiled step, in the order the breakdown stacks them (``profiled_<phase>_s`` in a record).
PHASES = ("draft", "verify", "accept", "other")


def write_plots(record: dict[str, Any], stem: Path) -> list[Path]:
    """Draw a record as two PNGs next to ``stem`` and return their paths:

    - ``<stem>-speedup.png``: wall-time speedup over the baseline against tokens committed per verify
      step (accepted + bonus/recovered) for every mmspec configuration; peers (no steps) as labelled
      horizontal lines at their speedup.
    - ``<stem>-steps.png``: the profiled time per verify step split into draft / verify (the target's
      forward) / accept (rule + commit) / other (prefill and loop bookkeeping, spread over the steps).
      The masked loop (CSpD, MuLo-SD) times its drafting only: its verify and accept are in other.

    Needs matplotlib (``pip install mmspec[plot]``)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ours = [r for r in record["results"] if not r["peer"] and r["steps"]]
    peers = [r for r in record["results"] if r["peer"]]
    title = f"{record['suite']} on {record['environment']['device_name']} ({record['environment']['date'][:10]})"
    paths = [stem.parent / f"{stem.name}-speedup.png", stem.parent / f"{stem.name}-steps.png"]
    stem.parent.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in ours:
        ax.scatter(r["mean_tokens_per_step_with_bonus"], r["speedup_vs_baseline"])
        ax.annotate(r["name"], (r["mean_tokens_per_step_with_bonus"], r["speedup_vs_baseline"]), fontsize=7)
    for i, r in enumerate(peers):
        ax.axhline(r["speedup_vs_baseline"], linestyle="--", linewidth=0.8, color=f"C{i % 10}")
        ax.annotate(r["name"], (0.01, r["speedup_vs_baseline"]), xycoords=("axes fraction", "data"), fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.5)
    ax.set_xlabel("tokens per verify step (accepted + bonus)")
    ax.set_ylabel("speedup over the baseline (wall time)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.45 * max(len(ours), 1)))
    left = [0.0] * len(ours)
    for phase in PHASES:
        ms = [1000 * (r[f"profiled_{phase}_s"] or 0.0) / r["steps"] for r in ours]
        ax.barh([r["name"] for r in ours], ms, left=left, label=phase)
        left = [a + b for a, b in zip(left, ms)]
    ax.invert_yaxis()
    ax.set_xlabel("ms per verify step (profiled run)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, not over them
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths
