"""Batch jobs for the command line (``mmspec generate``, ``mmspec caption``): resumable, skipping and
reporting bad items without losing good results, data-parallel under ``accelerate launch``.

Layout of an output folder: ``results.<rank>.jsonl`` (one line per finished item), ``errors.<rank>.jsonl``
(one line per bad item, with the reason) and ``stats.json`` (the summary, written by rank 0). An item
counts as done when its result line exists, so an interrupted job resumes where it stopped; results
are appended batch by batch (flushed and fsync-ed, see :mod:`mmspec.app.jobs_io`), and the folder is
locked for the job's duration so a second job on it is refused.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .jobs_io import (
    FolderLock,
    JobLockedError,
    append_jsonl,
    read_jsonl,
    remove_stale_temp_files,
    repair_jsonl,
    write_atomic,
)


@dataclass
class JobItem:
    """One input line: ``index`` (position in the input), ``raw`` (as given) and ``value`` (parsed)."""

    index: int
    raw: str
    value: Any = None


class JobOutput:
    """Appends results and errors for one process (``rank``) of a job in ``out_dir``.

    Writes go through :func:`~mmspec.app.jobs_io.append_jsonl` (whole lines, flushed and fsync-ed), so a
    crash can only tear a file's last line; :meth:`repair` cuts such a line off before appending.
    An error already recorded for an item with the same message is not written again, so reruns
    do not grow ``errors.<rank>.jsonl``.
    """

    def __init__(self, out_dir: Path, rank: int = 0) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.results_path = self.out_dir / f"results.{rank}.jsonl"
        self.errors_path = self.out_dir / f"errors.{rank}.jsonl"
        self._known_errors: set[tuple[int, str]] | None = None

    def repair(self) -> list[str]:
        """Cut a crash-torn last line off this rank's files; returns one message per repaired file."""
        notes = []
        for path in (self.results_path, self.errors_path):
            torn = repair_jsonl(path)
            if torn is not None:
                notes.append(
                    f"{path.name}: ignored an incomplete last line left by an interrupted run "
                    f"({len(torn)} characters: {torn[:60]!r}); its item is redone"
                )
        return notes

    @staticmethod
    def read(out_dir: Path, kind: str) -> list[dict]:
        """All records of ``kind`` ("results" or "errors") written by every rank, by index. Results
        count once per index (the first one written); an incomplete last line is ignored."""
        records = []
        for path in sorted(Path(out_dir).glob(f"{kind}.*.jsonl")):
            records += read_jsonl(path).records
        records.sort(key=lambda r: r["index"])
        if kind != "results":
            return records
        seen: set[int] = set()
        unique = []
        for r in records:
            if r["index"] not in seen:
                seen.add(r["index"])
                unique.append(r)
        return unique

    def results(self, records: list[dict]) -> None:
        """Append a batch of results with one durable write."""
        append_jsonl(self.results_path, records)

    def result(self, record: dict) -> None:
        self.results([record])

    def error(self, item: JobItem, message: str) -> None:
        if self._known_errors is None:
            self._known_errors = {(e["index"], e["error"]) for e in read_jsonl(self.errors_path).records}
        if (item.index, message) in self._known_errors:
            return
        self._known_errors.add((item.index, message))
        append_jsonl(self.errors_path, [{"index": item.index, "input": item.raw, "error": message}])


def job_state():
    """This process's place in a data-parallel job (``accelerate launch`` / ``torchrun``): accelerate's
    ``PartialState``, asked for the CPU backend when there is no GPU — without it, CPU processes
    launched together do not see each other and would each run every item (the training loop's
    :func:`~mmspec.training.loop.process_state`, imported here only when a job runs)."""
    from ..training.loop import process_state

    return process_state()


def lock_output(out_dir: Path) -> FolderLock:
    """Take this process's lock on ``out_dir`` (created if needed); ``SystemExit`` with the holder's
    pid and command if another job has it. Release with ``.release()`` (or use it as a context).

    In a data-parallel job every process locks its own rank's file and the processes agree (one
    all-reduce) before going on: if any of them is refused, all of them stop. Every job has a rank
    0, so two jobs on one folder always collide there, whatever their numbers of processes.
    """
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise SystemExit(f"error: --output-dir {out_dir} is a file, not a folder")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    state = job_state()
    lock, refusal = None, None
    try:
        lock = FolderLock(out_dir, state.process_index).acquire()
    except JobLockedError as err:
        refusal = str(err)
    if state.num_processes > 1:
        import torch
        import torch.distributed as dist

        agreed = torch.tensor([0 if refusal else 1], device=state.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        if int(agreed.item()) == 0 and refusal is None:
            lock.release()
            refusal = (
                f"output folder {out_dir} is in use by another mmspec job (another process of this job was "
                "refused its lock; its message names the holder)"
            )
    if refusal is not None:
        raise SystemExit(f"error: {refusal}")
    return lock


JOB_FILE = "job.json"


def check_same_job(out_dir: Path, raw_items: list[str], previous: dict[int, str], settings: dict | None) -> None:
    """Refuse to resume in ``out_dir`` when its results belong to another job: different inputs at the
    same positions (``previous``: index -> input of the results there), more results than inputs, or
    other ``settings`` than those recorded in ``job.json`` (written here on a first run)."""
    changed = [
        (i, old, raw_items[i]) for i, old in sorted(previous.items()) if i < len(raw_items) and old != raw_items[i]
    ]
    beyond = [i for i in previous if i >= len(raw_items)]
    hint = "use another --output-dir (or delete that folder to start over)"
    if changed:
        i, old, new = changed[0]
        raise SystemExit(
            f"error: {out_dir} holds results of another job: item {i} was {old!r}, now {new!r} "
            f"({len(changed)} items differ); {hint}"
        )
    if beyond:
        raise SystemExit(
            f"error: {out_dir} holds results for {len(previous)} items, more than this job's "
            f"{len(raw_items)} inputs; {hint}"
        )
    if settings is None:
        return
    path = Path(out_dir) / JOB_FILE
    recorded = json.loads(path.read_text()) if path.is_file() else None
    if recorded is not None and recorded != json.loads(json.dumps(settings)):
        keys = sorted(
            k for k in set(recorded) | set(settings) if recorded.get(k) != json.loads(json.dumps(settings)).get(k)
        )
        raise SystemExit(
            f"error: {out_dir} holds results made with other settings ({', '.join(keys)} differ: "
            f"{ {k: recorded.get(k) for k in keys} } before); {hint}"
        )
    if recorded is None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")


def run_job(
    raw_items: list[str],
    parse: Callable[[str], Any],
    process: Callable[[list[JobItem]], list[dict]],
    out_dir: Path,
    batch_size: int,
    desc: str,
    on_results: Callable[[list[dict]], None] | None = None,
    settings: dict | None = None,
) -> dict:
    """Parse, shard, skip finished items, process in batches; return the job's counts (``assigned``,
    ``skipped_done``, ``processed``: summed over all processes of a data-parallel job) and this
    process's ``repaired`` notes.

    ``parse(raw)`` raises ``ValueError`` for a bad item (recorded in errors, job goes on); it should
    be cheap (decode images in ``process``, a batch at a time). ``process(items)`` returns one result
    dict per item (each gets ``index`` and ``input`` added). A batch that raises ``ValueError`` is
    retried item by item so one bad item loses nothing else. ``on_results(records)`` is called with
    each batch's records once they are durably written (e.g. to append a user-facing file).
    ``settings``: what makes the outputs what they are (method, rule, sampling, seed, model...),
    JSON-serialisable; kept in ``job.json``. Resuming needs the same inputs at the same positions and
    the same settings: a folder holding another job's results is refused (a clear ``SystemExit``),
    never silently treated as done.

    Batches are cut from the list of valid items, finished or not, so a resumed job processes the
    remaining items in the same batches (hence with the same seeds) as an uninterrupted one.
    """
    state = job_state()
    if settings is not None and state.num_processes > 1:
        # Items are sharded by rank and batched per rank, so the seeds (and outputs) depend on the number
        # of processes: a job resumed with another number would mix two seedings. (A one-process job
        # records nothing, so job.json files written before this key still match.)
        settings = {**settings, "num_processes": state.num_processes}
    with lock_output(out_dir):
        output = JobOutput(out_dir, state.process_index)
        notes = output.repair()
        remove_stale_temp_files(out_dir)
        for note in notes:
            print(f"warning: {note}", file=sys.stderr)
        previous = {r["index"]: r["input"] for r in JobOutput.read(out_dir, "results")}
        check_same_job(out_dir, raw_items, previous, settings)
        done = set(previous)
        mine = [JobItem(i, raw) for i, raw in enumerate(raw_items) if i % state.num_processes == state.process_index]
        valid, skipped = [], 0
        for item in mine:
            if item.index in done:
                skipped += 1
                valid.append(item)
                continue
            try:
                item.value = parse(item.raw)
            except ValueError as err:
                output.error(item, str(err))
                continue
            valid.append(item)
        batches = [
            [it for it in valid[s : s + batch_size] if it.index not in done] for s in range(0, len(valid), batch_size)
        ]
        batches = [b for b in batches if b]
        todo = sum(len(b) for b in batches)
        failed = 0
        with tqdm(total=todo, desc=desc, unit="item", disable=not state.is_local_main_process) as bar:
            for batch in batches:
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
                records = [
                    {"index": item.index, "input": item.raw, **result}
                    for items, results in groups
                    for item, result in zip(items, results)
                ]
                output.results(records)
                if on_results is not None and records:
                    on_results(records)
                bar.update(len(batch))
    state.wait_for_everyone()
    counts = [len(mine), skipped, todo - failed]
    if state.num_processes > 1:  # the whole job's numbers, for rank 0's report
        import torch
        import torch.distributed as dist

        total = torch.tensor(counts, device=state.device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        counts = total.tolist()
    return {"assigned": counts[0], "skipped_done": counts[1], "processed": counts[2], "repaired": notes}


def parse_key_values(pairs: list[str], what: str) -> dict:
    """``["k=100", "delta=0.1", "mode=tvd"]`` -> ``{"k": 100, "delta": 0.1, "mode": "tvd"}`` (values are
    JSON when they parse as JSON, ``inf`` / ``+inf`` / ``-inf`` floats, strings otherwise); ``what``
    names the source in error messages."""
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"{what}: expected key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        if value.strip().lower() in ("inf", "+inf", "-inf"):  # e.g. a router's tau=+inf / -inf
            options[key] = float(value)
            continue
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def report(out_dir: Path, job: dict, what: str, extra: dict, rate_label: str = "mean accepted drafts per step") -> dict:
    """Rank 0 after a job: write ``stats.json``, print the outcome and every skipped item.
    ``rate_label`` names the ratio of the records' ``row_accepted`` to ``row_steps`` (omitted when no
    record counts steps)."""
    summary = write_summary(out_dir, extra)
    results = JobOutput.read(out_dir, "results")
    steps = sum(r.get("row_steps", 0) for r in results)  # families that count drafts per step
    accepted = sum(r.get("row_accepted", 0) for r in results)
    rate = f"; {rate_label}: {accepted / steps:.2f}" if steps else ""
    print(
        f"{summary['num_results']} {what} in {out_dir} ({summary['num_errors']} bad items; this run: "
        f"{job['processed']} new, {job['skipped_done']} already done){rate}"
    )
    for err in summary["errors"]:
        print(f"  skipped item {err['index']} ({err['input']!r}): {err['error']}")
    for note in job.get("repaired", []):
        print(f"  repaired: {note}")
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
    write_atomic(Path(out_dir) / "stats.json", json.dumps(summary, indent=2) + "\n")
    return summary
