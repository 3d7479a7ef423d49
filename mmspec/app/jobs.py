"""Batch jobs for the command line (``mmspec generate``, ``mmspec caption``): resumable, skipping and
reporting bad items without losing good results, data-parallel under ``accelerate launch``.

Layout of an output folder: ``results.<rank>.jsonl`` (one line per finished item), ``errors.<rank>.jsonl``
(one line per bad item, with the reason) and ``stats.json`` (the summary, written by rank 0). An item
counts as done when its result line exists, so an interrupted job resumes where it stopped; results
are appended and flushed item by item.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm


@dataclass
class JobItem:
    """One input line: ``index`` (position in the input), ``raw`` (as given) and ``value`` (parsed)."""

    index: int
    raw: str
    value: Any = None


class JobOutput:
    """Appends results and errors for one process (``rank``) of a job in ``out_dir``."""

    def __init__(self, out_dir: Path, rank: int = 0) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.results_path = self.out_dir / f"results.{rank}.jsonl"
        self.errors_path = self.out_dir / f"errors.{rank}.jsonl"

    @staticmethod
    def read(out_dir: Path, kind: str) -> list[dict]:
        """All records of ``kind`` ("results" or "errors") written by every rank, by index."""
        records = []
        for path in sorted(Path(out_dir).glob(f"{kind}.*.jsonl")):
            for line in path.read_text().splitlines():
                if line.strip():
                    records.append(json.loads(line))
        return sorted(records, key=lambda r: r["index"])

    def _append(self, path: Path, record: dict) -> None:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def result(self, record: dict) -> None:
        self._append(self.results_path, record)

    def error(self, item: JobItem, message: str) -> None:
        self._append(self.errors_path, {"index": item.index, "input": item.raw, "error": message})


def job_state():
    """This process's place in a data-parallel job (``accelerate launch`` / ``torchrun``): accelerate's
    ``PartialState``, asked for the CPU backend when there is no GPU — without it, CPU processes
    launched together do not see each other and would each run every item."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def run_job(
    raw_items: list[str],
    parse: Callable[[str], Any],
    process: Callable[[list[JobItem]], list[dict]],
    out_dir: Path,
    batch_size: int,
    desc: str,
) -> dict:
    """Parse, shard, skip finished items, process in batches; return this process's summary.

    ``parse(raw)`` raises ``ValueError`` for a bad item (recorded in errors, job goes on);
    ``process(items)`` returns one result dict per item (each gets ``index`` and ``input`` added).
    A batch that raises ``ValueError`` is retried item by item so one bad item loses nothing else.
    """
    state = job_state()
    output = JobOutput(out_dir, state.process_index)
    done = {r["index"] for r in JobOutput.read(out_dir, "results")}
    mine = [JobItem(i, raw) for i, raw in enumerate(raw_items) if i % state.num_processes == state.process_index]
    todo, skipped = [], 0
    for item in mine:
        if item.index in done:
            skipped += 1
            continue
        try:
            item.value = parse(item.raw)
        except ValueError as err:
            output.error(item, str(err))
            continue
        todo.append(item)
    failed = 0
    with tqdm(total=len(todo), desc=desc, unit="item", disable=not state.is_local_main_process) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            try:
                groups = [(batch, process(batch))]
            except ValueError:
                groups = []
                for item in batch:  # isolate the bad item(s)
                    try:
                        groups.append(([item], process([item])))
                    except ValueError as err:
                        output.error(item, str(err))
                        failed += 1
            for items, results in groups:
                for item, result in zip(items, results):
                    output.result({"index": item.index, "input": item.raw, **result})
            bar.update(len(batch))
    state.wait_for_everyone()
    return {"assigned": len(mine), "skipped_done": skipped, "processed": len(todo) - failed}


def parse_key_values(pairs: list[str], what: str) -> dict:
    """``["k=100", "delta=0.1", "mode=tvd"]`` -> ``{"k": 100, "delta": 0.1, "mode": "tvd"}`` (values are
    JSON when they parse as JSON, strings otherwise); ``what`` names the source in error messages."""
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"{what}: expected key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def report(out_dir: Path, job: dict, what: str, extra: dict) -> dict:
    """Rank 0 after a job: write ``stats.json``, print the outcome and every skipped item."""
    summary = write_summary(out_dir, extra)
    results = JobOutput.read(out_dir, "results")
    steps = sum(r["row_steps"] for r in results)
    accepted = sum(r["row_accepted"] for r in results)
    print(f"{summary['num_results']} {what} in {out_dir} ({summary['num_errors']} bad items; this run: "
          f"{job['processed']} new, {job['skipped_done']} already done); "
          f"mean accepted drafts per step: {accepted / max(steps, 1):.2f}")
    for err in summary["errors"]:
        print(f"  skipped item {err['index']} ({err['input']!r}): {err['error']}")
    return summary


def write_summary(out_dir: Path, extra: dict) -> dict:
    """Rank 0: gather every rank's records into ``stats.json``; returns it."""
    results = JobOutput.read(out_dir, "results")
    finished = {r["index"] for r in results}
    # A resumed job re-tries bad items: report each one once (its latest error), and not at all
    # once it has succeeded.
    latest = {e["index"]: e for e in JobOutput.read(out_dir, "errors")}
    errors = [e for i, e in sorted(latest.items()) if i not in finished]
    summary = {"num_results": len(results), "num_errors": len(errors), "errors": errors, **extra}
    (Path(out_dir) / "stats.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
