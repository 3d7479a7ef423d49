"""The ``mmspec`` command line. Each subcommand is a small function registered in ``COMMANDS``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import torch

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, add_args: Callable[[argparse.ArgumentParser], None]):
    """Register ``run(args) -> exit code`` as ``mmspec <name>`` with its argument definitions."""

    def wrap(run):
        COMMANDS[name] = (add_args, run)
        return run

    return wrap


def _parse_options(pairs: list[str]) -> dict:
    """``["dim=512", "temperature=0.7"]`` -> ``{"dim": 512, "temperature": 0.7}`` (JSON values)."""
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--option expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _bench_args(p: argparse.ArgumentParser) -> None:
    from .bench import BENCH_SUITES

    p.add_argument("--suite", default="lm", help=f"benchmark suite (available: {', '.join(sorted(BENCH_SUITES))})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="suite-specific setting (repeatable)")
    p.add_argument("--output", type=Path, default=None, help="JSON record path (default results/bench-<suite>.json)")


@command("bench", _bench_args)
def bench(args: argparse.Namespace) -> int:
    """Run baseline and speculative configurations on the same inputs; write a JSON record."""
    from .bench import BENCH_SUITES, format_table, run_benchmark, write_record

    if args.suite not in BENCH_SUITES:
        raise SystemExit(f"unknown suite {args.suite!r}; available: {', '.join(sorted(BENCH_SUITES))}")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    suite = BENCH_SUITES[args.suite](device, dtype, args.batch_size, **_parse_options(args.option))
    record = run_benchmark(suite, device, repeats=args.repeats, warmup=args.warmup, seed=args.seed)
    out = args.output or Path("results") / f"bench-{args.suite}.json"
    write_record(record, out)
    print(format_table(record))
    print(f"\nwrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmspec", description="Speculative decoding for multimodal generative models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=(run.__doc__ or "").split("\n")[0])
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args._run(args)


if __name__ == "__main__":
    raise SystemExit(main())
