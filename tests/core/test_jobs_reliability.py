"""Batch jobs never lose or duplicate work: torn last lines, a locked output folder, results visible
while a job runs, and real ``mmspec generate`` processes killed with SIGKILL at random points, then
resumed, ending with exactly the outputs of an uninterrupted run."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmspec.app import jobs
from mmspec.app.cli import main
from mmspec.app.jobs_io import (
    FolderLock,
    JobLockedError,
    append_jsonl,
    read_jsonl,
    repair_jsonl,
)

from ..conftest import CLI_ENV, run_distributed, tiny_llamagen


def _double(items):
    return [{"double": it.value * 2} for it in items]


def test_torn_last_line_is_ignored_reported_and_repaired(tmp_path, capsys):
    out = tmp_path / "out"
    assert jobs.run_job(["1", "2", "3", "4"], int, _double, out, batch_size=2, desc="t")["processed"] == 4
    results = out / "results.0.jsonl"
    whole = results.read_bytes()
    results.write_bytes(whole[: -len(whole.splitlines()[-1]) // 2 - 1])  # the last line cut in the middle
    contents = read_jsonl(results)
    assert [r["index"] for r in contents.records] == [0, 1, 2] and contents.torn.startswith('{"index": 3')
    assert [r["index"] for r in jobs.JobOutput.read(out, "results")] == [0, 1, 2]  # readers skip it
    summary = jobs.run_job(["1", "2", "3", "4"], int, _double, out, batch_size=2, desc="t")
    assert summary["processed"] == 1 and summary["skipped_done"] == 3
    assert "incomplete last line" in summary["repaired"][0] and "incomplete last line" in capsys.readouterr().err
    assert results.read_bytes() == whole  # item 3 redone, the torn bytes gone
    assert repair_jsonl(results) is None
    # A complete line without its newline is also an unfinished write; corruption elsewhere is an error.
    results.write_bytes(whole.rstrip(b"\n"))
    assert [r["index"] for r in read_jsonl(results).records] == [0, 1, 2]
    results.write_bytes(b"garbage\n" + whole)
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        read_jsonl(results)


def test_append_never_merges_into_a_torn_line(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text('{"a": 1}\n{"a": ')
    append_jsonl(path, [{"a": 2}, {"a": 3}])
    assert path.read_text().splitlines()[-2:] == ['{"a": 2}', '{"a": 3}']


def test_errors_are_not_duplicated_on_rerun_and_results_count_once(tmp_path):
    def process(items):
        if any(it.value == 3 for it in items):
            raise ValueError("three is cursed")
        return _double(items)

    raw = ["1", "x", "3", "4"]
    for _ in range(3):
        jobs.run_job(raw, int, process, tmp_path, batch_size=4, desc="t")
    errors = (tmp_path / "errors.0.jsonl").read_text().splitlines()
    assert len(errors) == 2  # "x" and "3", once each however many reruns
    # A duplicated result line (e.g. from a job run before this version) counts once.
    line = (tmp_path / "results.0.jsonl").read_text().splitlines()[0]
    with (tmp_path / "results.0.jsonl").open("a") as f:
        f.write(line + "\n")
    assert jobs.write_summary(tmp_path, {})["num_results"] == 2


def test_results_are_visible_while_the_job_runs(tmp_path):
    seen = []

    def process(items):
        seen.append([r["index"] for r in read_jsonl(tmp_path / "results.0.jsonl").records])
        return _double(items)

    appended = []
    jobs.run_job(
        [str(i) for i in range(6)],
        int,
        process,
        tmp_path,
        batch_size=2,
        desc="t",
        on_results=lambda records: appended.append([r["index"] for r in records]),
    )
    assert seen == [[], [0, 1], [0, 1, 2, 3]]  # each batch finds the earlier batches on disk
    assert appended == [[0, 1], [2, 3], [4, 5]]


def test_resume_keeps_the_original_batches(tmp_path):
    """Batches are cut from all valid items, so a resumed job processes the rest in the same
    groups (same seeds) as an uninterrupted run, even after an item failed inside a batch."""
    calls = []

    def process(items):
        calls.append([it.index for it in items])
        if any(it.value == 2 for it in items):
            raise ValueError("two fails")
        return _double(items)

    raw = [str(i) for i in range(7)]
    jobs.run_job(raw, int, process, tmp_path, batch_size=3, desc="t")
    first = list(calls)
    assert first == [[0, 1, 2], [0], [1], [2], [3, 4, 5], [6]]
    calls.clear()
    (tmp_path / "results.0.jsonl").write_text(
        "".join(
            line + "\n"
            for line in (tmp_path / "results.0.jsonl").read_text().splitlines()
            if json.loads(line)["index"] < 3
        )
    )
    jobs.run_job(raw, int, process, tmp_path, batch_size=3, desc="t")
    assert calls == [[2], [2], [3, 4, 5], [6]]  # item 2 alone (then its retry), not [2, 3, 4], [5, 6]


def _hold_lock(folder: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from mmspec.app.jobs_io import FolderLock; FolderLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, cwd=folder.parent, env=CLI_ENV
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_second_job_on_a_folder_is_refused_naming_the_other_process(tmp_path, model_dir, monkeypatch):
    from mmspec.app import generate_llamagen

    monkeypatch.setattr(
        generate_llamagen, "load_llamagen", lambda *a, **k: pytest.fail("loaded the model despite the lock")
    )
    out = tmp_path / "out"
    out.mkdir()
    holder = _hold_lock(out)
    try:
        with pytest.raises(JobLockedError, match=f"in use by another mmspec job: process {holder.pid}"):
            FolderLock(out).acquire()
        labels = tmp_path / "labels.txt"
        labels.write_text("0\n")
        # Refused before the model loads.
        with pytest.raises(SystemExit, match=rf"process {holder.pid} \(.*-c.*\).*another --output-dir"):
            main(["generate", "--model", str(model_dir), "--labels-file", str(labels), "--output-dir", str(out)])
        assert not list(out.glob("results.*"))
    finally:
        holder.kill()
        holder.wait()
    # The kernel releases the lock of a killed process: no stale lock.
    with FolderLock(out), FolderLock(out):  # re-entrant within one process
        pass


def test_every_process_of_a_data_parallel_job_stops_when_the_folder_is_taken(tmp_path, model_dir):
    """Two processes started together (torchrun) against a folder another job holds: the one refused
    and the one whose own lock was free both stop, before writing anything."""
    out = tmp_path / "out"
    out.mkdir()
    labels = tmp_path / "labels.txt"
    labels.write_text("0\n1\n2\n3\n")
    holder = _hold_lock(out)
    try:
        run = run_distributed(
            ["generate", "--model", str(model_dir), "--labels-file", str(labels), "--output-dir", str(out)]
            + ["--speculative", "none", "--device", "cpu"],
            cwd=tmp_path,
        )
    finally:
        holder.kill()
        holder.wait()
    assert run.returncode != 0
    assert f"in use by another mmspec job: process {holder.pid}" in run.stderr
    assert "another process of this job was refused its lock" in run.stderr
    assert not list(out.glob("results.*")) and not list(out.glob("*.png"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from mmspec.pipelines.llamagen import LlamaGenPipeline

    gpt, vq = tiny_llamagen()
    path = tmp_path_factory.mktemp("pipe")
    LlamaGenPipeline(target=gpt, vq=vq).save_pretrained(path)
    return path


LABELS = [str(i % 5) for i in range(23)] + ["banana", "7"] + ["1", "2", "3"]


def _generate_args(model_dir, out, labels):
    return [
        "generate",
        "--model",
        str(model_dir),
        "--labels-file",
        str(labels),
        "--output-dir",
        str(out),
        "--batch-size",
        "2",
        "--num-draft-tokens",
        "3",
        "--seed",
        "11",
        "--device",
        "cpu",
    ]


def _outputs(out: Path) -> tuple[dict, dict]:
    """Result records without timings, and every image's bytes."""
    records = {}
    for path in out.glob("results.*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            record.pop("batch_seconds")
            assert record["index"] not in records, f"item {record['index']} has two result lines"
            records[record["index"]] = record
    images = {p.name: p.read_bytes() for p in out.glob("*.png")}
    return records, images


def _kill_at_random_points(seed: int, model_dir: Path, labels: Path, out: Path, num_results: int) -> int:
    """Start `mmspec generate` into ``out`` and SIGKILL it at a random point; with probability 1/2
    start it again and kill that resumed run too. Returns the number of kills."""
    rng = random.Random(seed)
    results = out / "results.0.jsonl"
    kills = 0
    for attempt in range(2):
        if attempt and rng.random() < 0.5:
            break
        run = subprocess.Popen(
            [sys.executable, "-m", "mmspec.app.cli", *_generate_args(model_dir, out, labels)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=out.parent,
            env=CLI_ENV,
        )
        done = len(read_jsonl(results).records)
        target = done + rng.randint(0, (num_results - done) // 2)  # finished items before the kill
        deadline = time.monotonic() + 120
        while run.poll() is None and time.monotonic() < deadline:
            if results.exists() and len(read_jsonl(results).records) >= target:
                time.sleep(rng.random() * 0.02)  # and a random point inside the next batch
                break
            time.sleep(0.002)
        if run.poll() is None:
            run.send_signal(signal.SIGKILL)
            kills += 1
        run.wait()
    return kills


def test_killed_jobs_resume_to_the_uninterrupted_outputs(model_dir, tmp_path):
    """SIGKILL a real `mmspec generate` at random points (three seeds, run side by side; a kill comes
    after a random number of finished items plus a random delay; a resumed run may be killed again),
    then resume: the final folder equals an uninterrupted run's, and every input is accounted for
    exactly once."""
    from concurrent.futures import ThreadPoolExecutor

    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    reference = tmp_path / "reference"
    assert main(_generate_args(model_dir, reference, labels)) == 0
    want_records, want_images = _outputs(reference)
    assert len(want_records) == 26 and len(want_images) == 26
    seeds = range(3)
    with ThreadPoolExecutor(len(seeds)) as pool:  # real processes, killed side by side
        kills = list(
            pool.map(
                lambda seed: _kill_at_random_points(seed, model_dir, labels, tmp_path / f"killed{seed}", 26), seeds
            )
        )
    assert all(k >= 1 for k in kills), f"a job finished before it could be killed: {kills}"
    for seed in seeds:
        out = tmp_path / f"killed{seed}"
        assert main(_generate_args(model_dir, out, labels)) == 0  # the resume (in this process: no start-up cost)
        records, images = _outputs(out)
        assert records == want_records and images == want_images, f"seed {seed}"
        errors = [json.loads(line) for line in (out / "errors.0.jsonl").read_text().splitlines()]
        assert sorted(e["index"] for e in errors) == [23, 24]  # once each, however many runs
        assert sorted([*records, *(e["index"] for e in errors)]) == list(range(len(LABELS)))
        stats = json.loads((out / "stats.json").read_text())
        assert stats["num_results"] == 26 and stats["num_errors"] == 2
        assert not list(out.glob(".*.tmp"))  # no half-written image or stats file left behind


def test_a_folder_of_another_job_is_refused_not_treated_as_done(tmp_path):
    """Resuming needs the same inputs at the same positions and the same settings: other inputs,
    more results than inputs, or other settings are refused (never silently 'already done')."""
    from mmspec.app.jobs import JOB_FILE, check_same_job

    settings = {"speculative": "sjd", "seed": 0}
    check_same_job(tmp_path, ["0", "16", "3"], {}, settings)  # first run: records the settings
    assert json.loads((tmp_path / JOB_FILE).read_text()) == settings
    check_same_job(tmp_path, ["0", "16", "3"], {0: "0", 1: "16"}, settings)  # the same job resumes
    with pytest.raises(SystemExit, match=r"item 0 was '0', now '5' \(3 items differ\)"):
        check_same_job(tmp_path, ["5", "6", "7"], {0: "0", 1: "16", 2: "3"}, settings)
    with pytest.raises(SystemExit, match="results for 3 items, more than this job's 1 inputs"):
        check_same_job(tmp_path, ["0"], {0: "0", 1: "16", 2: "3"}, settings)
    with pytest.raises(SystemExit, match="other settings .*speculative differ"):
        check_same_job(tmp_path, ["0", "16", "3"], {0: "0"}, {"speculative": "mulo", "seed": 0})


def test_a_job_where_every_item_failed_exits_nonzero(model_dir, tmp_path, capsys):
    args = ["generate", "--model", str(model_dir), "--speculative", "none", "--device", "cpu"]
    assert main([*args, "--class-labels", "40,-1", "--output-dir", str(tmp_path / "bad")]) == 1
    assert "error: every item failed (2 bad items above)" in capsys.readouterr().err
    assert main([*args, "--class-labels", "0,40", "--output-dir", str(tmp_path / "mixed")]) == 0  # one good image


def test_another_eagle_head_is_another_job(tmp_path):
    """The head drafts, so it decides the draws: resuming with another head (or the same folder
    retrained) is refused; the same head resumes."""
    import shutil

    from safetensors.torch import load_file, save_file

    from mmspec.app.generators import assets_dir

    head = tmp_path / "head"
    shutil.copytree(assets_dir() / "llamagen-emoji" / "eagle", head)
    out = tmp_path / "out"
    args = [
        "generate",
        "--speculative",
        "eagle",
        "--eagle-head",
        str(head),
        "--output-dir",
        str(out),
        "--device",
        "cpu",
    ]
    assert main([*args, "--class-labels", "0"]) == 0
    assert json.loads((out / jobs.JOB_FILE).read_text())["eagle_head"]["path"] == str(head.resolve())
    assert main([*args, "--class-labels", "0,1"]) == 0  # the same head: resumed
    weights = load_file(head / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] * 1.5  # "retrained" in place
    save_file(weights, head / "model.safetensors")
    with pytest.raises(SystemExit, match="other settings .*eagle_head differ"):
        main([*args, "--class-labels", "0,1,2"])


def test_a_job_resumed_with_another_number_of_processes_is_refused(model_dir, tmp_path):
    """Items are sharded and batched per process, so their seeds depend on the number of processes:
    a two-process job's folder is not resumed by one process. Its report counts both processes' items."""
    labels = tmp_path / "labels.txt"
    labels.write_text("0\n1\n2\n3\n4\n")
    out = tmp_path / "out"
    args = ["generate", "--model", str(model_dir), "--labels-file", str(labels), "--output-dir", str(out)]
    args += ["--speculative", "none", "--batch-size", "2", "--device", "cpu"]
    run = run_distributed(args, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "this run: 5 new, 0 already done" in run.stdout
    assert json.loads((out / jobs.JOB_FILE).read_text())["num_processes"] == 2
    with pytest.raises(SystemExit, match="other settings .*num_processes differ"):
        main(args)


def test_heatmaps_on_a_resumed_job_say_which_earlier_items_have_none(model_dir, tmp_path, capsys):
    args = ["generate", "--model", str(model_dir), "--output-dir", str(tmp_path / "out"), "--device", "cpu"]
    assert main([*args, "--class-labels", "0,1"]) == 0
    capsys.readouterr()
    assert main([*args, "--class-labels", "0,1,2", "--heatmaps"]) == 0
    err = capsys.readouterr().err
    assert "warning: 2 results from an earlier run without --heatmaps have no heat-map (items 0, 1)" in err
    assert [p.name for p in (tmp_path / "out").glob("*_accept.png")] == ["00002_accept.png"]  # the new item's
