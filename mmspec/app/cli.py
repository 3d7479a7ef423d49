"""The ``mmspec`` command line. Each subcommand is a small function registered in ``COMMANDS``.

Start-up is kept fast: torch, diffusers and transformers are imported inside the commands, and only
the chosen subcommand's arguments are built (``mmspec --help`` lists commands without loading any).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

from .models import add_device, add_model, resolve_device, resolve_dtype

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, add_args: Callable[[argparse.ArgumentParser], None]):
    """Register ``run(args) -> exit code`` as ``mmspec <name>`` with its argument definitions."""

    def wrap(run):
        COMMANDS[name] = (add_args, run)
        return run

    return wrap


def _bench_args(p: argparse.ArgumentParser) -> None:
    from .bench import load_suites

    p.add_argument("--suite", default="lm", help=f"benchmark suite (available: {', '.join(sorted(load_suites()))})")
    add_device(p)
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--batch-size", type=int, default=1, help="inputs per pipeline call")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per configuration first")
    p.add_argument("--seed", type=int, default=0, help="seed of every run (the same for baseline and methods)")
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="suite-specific setting (repeatable)"
    )
    p.add_argument("--output", type=Path, default=None, help="JSON record path (default results/bench-<suite>.json)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--plots",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write <output>-speedup.png and <output>-steps.png (needs matplotlib)",
    )


@command("bench", _bench_args)
def bench(args: argparse.Namespace) -> int:
    """Run baseline and speculative configurations on the same inputs; write a JSON record."""
    import inspect

    import torch

    from ..training.settings import check_at_least
    from .bench import BENCH_SUITES, format_table, run_benchmark, typed_options, write_plots, write_record

    if args.suite not in BENCH_SUITES:
        raise SystemExit(f"error: unknown suite {args.suite!r}; available: {', '.join(sorted(BENCH_SUITES))}")
    # Wrong for every suite: refused here, before any model loads (run_benchmark checks only after).
    check_at_least(args, {"repeats": 1, "warmup": 0, "batch_size": 1, "threads": 1})  # --threads None: torch's
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    from .jobs import parse_key_values

    try:
        options = parse_key_values(args.option, "--option")
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    factory = BENCH_SUITES[args.suite]
    accepted = list(inspect.signature(factory).parameters)[3:]  # after (device, dtype, batch_size)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise SystemExit(
            f"error: --option {', '.join(unknown)}: not a setting of suite {args.suite!r}; its settings: "
            + ", ".join(accepted)
        )
    try:
        options = typed_options(factory, options)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    try:  # settings the suite refuses (a bad value, a missing folder): its message, before anything runs
        suite = factory(device, dtype, args.batch_size, **options)
    except (ValueError, OSError) as err:
        raise SystemExit(f"error: --suite {args.suite}: {err}") from None
    record = run_benchmark(suite, device, repeats=args.repeats, warmup=args.warmup, seed=args.seed)
    out = args.output or Path("results") / f"bench-{args.suite}.json"
    write_record(record, out)
    print(format_table(record))
    print(f"\nwrote {out}")
    if args.plots:
        try:
            plots = write_plots(record, out.with_suffix(""))
        except ImportError:
            print("no plots: matplotlib is not installed (pip install mmspec[plot])")
        else:
            print("plots: " + ", ".join(str(p) for p in plots))
    return 0


def _generate_args(p: argparse.ArgumentParser) -> None:
    from .generators import load_families

    families = load_families()
    add_model(p)
    inputs = p.add_mutually_exclusive_group()
    inputs.add_argument(
        "--class-labels", default=None, help="comma-separated class ids, e.g. 3,7,12 (default: 0,1,2,3)"
    )
    inputs.add_argument("--labels-file", type=Path, default=None, help="one class id per line (batch mode)")
    inputs.add_argument("--prompt", action="append", default=None, help="a text prompt (repeatable; text-to-X models)")
    inputs.add_argument("--prompts-file", type=Path, default=None, help="one text prompt per line (batch mode)")
    p.add_argument(
        "--output-dir",
        type=Path,
        default=Path("outputs/generate"),
        help="outputs, results.<rank>.jsonl, errors.<rank>.jsonl and stats.json (rerun to resume)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="items per pipeline call")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="classifier-free guidance (> 1 runs the CFG pair)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus threshold in (0, 1] (1: off)")
    p.add_argument("--seed", type=int, default=0, help="batch b uses seed + index of its first item")
    p.add_argument(
        "--speculative",
        default=None,
        help="a method of `mmspec methods` for this model's family (sjd, draft-model, eagle, mulo, ...) or 'none' "
        "for the baseline (default: the family's own, "
        + ", ".join(f"{f.name}: {f.default_method}" for f in families.values() if f.default_method)
        + ")",
    )
    p.add_argument(
        "--speculative-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the speculative method (repeatable), e.g. init=copy (sjd); upsampler=learned, "
        "max_rounds=2 (mulo)",
    )
    p.add_argument(
        "--num-draft-tokens",
        type=int,
        default=None,
        help="drafts per step (SJD: its window; MAR: CSpD's gamma); default: the family's (MAR 4, others 8)",
    )
    p.add_argument(
        "--acceptance",
        default=None,
        help="acceptance rule: exact, greedy, lantern, gsd (causal methods), mulo (mulo) ... "
        "(default: the method's own rule)",
    )
    p.add_argument(
        "--acceptance-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the acceptance rule (repeatable), e.g. delta=0.1, k=100, variant=official; "
        "for mulo: tau=0.02",
    )
    add_device(p)
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    for family in families.values():
        if family.add_args is not None:
            family.add_args(p.add_argument_group(f"{family.name} ({family.description})"))


def _read_inputs(args: argparse.Namespace, kind: str, family: str) -> list[str]:
    """The raw items of ``mmspec generate`` (class ids or prompts, as the family takes them)."""
    from .generators import CLASS_LABELS

    labels_given = args.class_labels is not None or args.labels_file is not None
    prompts_given = args.prompt is not None or args.prompts_file is not None
    if kind == CLASS_LABELS and prompts_given:
        raise SystemExit(f"error: {family} models take class labels (--class-labels / --labels-file), not prompts")
    if kind != CLASS_LABELS and labels_given:
        raise SystemExit(f"error: {family} models take prompts (--prompt / --prompts-file), not class labels")
    file = args.labels_file if kind == CLASS_LABELS else args.prompts_file
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as err:
            raise SystemExit(f"error: {'--labels-file' if kind == CLASS_LABELS else '--prompts-file'}: {err}") from None
        raw = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    elif kind == CLASS_LABELS:
        raw = [
            x.strip() for x in ("0,1,2,3" if args.class_labels is None else args.class_labels).split(",") if x.strip()
        ]
    else:
        raw = [x.strip() for x in args.prompt or [] if x.strip()]
    if not raw:
        what = (
            "class labels (--class-labels or --labels-file)"
            if kind == CLASS_LABELS
            else "prompts (--prompt or --prompts-file)"
        )
        raise SystemExit(f"error: nothing to generate: give {what}")
    return raw


def _choose_model(args: argparse.Namespace):
    """``--model`` resolved to a family and folder; ``args.model`` becomes that folder (None for the
    family's embedded default, as before the family registry, so job records stay comparable), and an
    unset ``--num-draft-tokens`` the family's default."""
    from .generators import assets_dir, resolve_model

    if getattr(args, "official_gpt", None) or getattr(args, "official_vq", None):
        if args.model is not None:
            raise SystemExit("error: pass either --model or --official-gpt/--official-vq, not both")
        family, path = resolve_model("llamagen").family, None
    else:
        choice = resolve_model(args.model)
        family = choice.family
        embedded = family.embedded is not None and choice.path == assets_dir() / family.embedded
        args.model = None if embedded else str(choice.path)
        path = None if embedded else choice.path
    if args.num_draft_tokens is None:
        args.num_draft_tokens = family.default_num_draft_tokens
    return family, path


@command("generate", _generate_args)
def generate(args: argparse.Namespace) -> int:
    """Generate from any family's model (batch over class labels or prompts; resumable; bad items
    skipped and reported).

    Steps: 1. settings → 2. model → 3. the family's job → 4. run and report."""
    from .generators import check_foreign_options
    from .job_settings import check_generate_settings
    from .jobs import job_state, lock_output, report, run_job

    # 1. Settings wrong for every item fail here, before the model loads (exit code 1, the message).
    family, path = _choose_model(args)
    check_foreign_options(args, family)
    if args.speculative is None:
        args.speculative = family.default_method or "none"
    check_generate_settings(args, family)
    raw = _read_inputs(args, family.inputs, family.name)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    lock = lock_output(args.output_dir)  # a second job on this folder stops here, before loading
    # 2. The model, then 3. the family's job: settings checked against the model, still before any item.
    pipe = family.load(args, path, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    try:
        job = family.prepare(pipe, args, device)
    except (ValueError, TypeError) as err:
        raise SystemExit(f"error: {err}") from None
    # 4. The shared job machinery: batches, resume, sharding, bad items, stats.json.
    with lock:
        done = run_job(
            raw, job.parse, job.process, args.output_dir, args.batch_size, desc="generate", settings=job.settings
        )
        if job_state().is_main_process:
            summary = report(args.output_dir, done, job.what, {"family": family.name, **job.summary}, job.rate_label)
            if getattr(args, "heatmaps", False):
                _warn_missing_heatmaps(args.output_dir)
            return _job_exit_code(summary)
    return 0


def _warn_missing_heatmaps(out_dir: Path) -> None:
    """``--heatmaps`` on a resumed job draws the new items' maps only: the earlier items' per-token
    records are not kept, so say which results have none rather than leave a silently partial set."""
    from .jobs import JobOutput

    missing = [r["index"] for r in JobOutput.read(out_dir, "results") if "heatmap" not in r]
    if missing:
        print(
            f"warning: {len(missing)} results from an earlier run without --heatmaps have no heat-map (items "
            f"{', '.join(map(str, missing[:8]))}{', ...' if len(missing) > 8 else ''}); a new --output-dir "
            "draws them all",
            file=sys.stderr,
        )


def _job_exit_code(summary: dict) -> int:
    """A batch job's exit code from its ``stats.json`` summary: 1 when every item failed (nothing to
    show, so a script must notice), 0 otherwise (bad items beside good ones are reported, not fatal)."""
    if summary["num_results"] == 0 and summary["num_errors"] > 0:
        print(f"error: every item failed ({summary['num_errors']} bad items above)", file=sys.stderr)
        return 1
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    from .generators import load_families

    add_model(p)
    p.add_argument(
        "--method",
        action="append",
        default=[],
        metavar="SPEC",
        help="SPECULATIVE[:ACCEPTANCE[:RULE_OPTIONS[:METHOD_OPTIONS]]] (options: key=value,...), e.g. sjd, "
        "sjd:lantern:delta=0.1,k=100, sjd:gsd, mulo::tau=0.02:upsampler=learned (repeatable; an empty "
        "rule = the method's own; default: the family's own method)",
    )
    p.add_argument("--num-images", type=int, default=64, help="outputs per method (and per baseline)")
    p.add_argument("--classes", default=None, help="comma-separated class ids to cycle through (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="items per pipeline call")
    p.add_argument("--seed", type=int, default=0, help="seed of the first batch (the same for every method)")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="classifier-free guidance (> 1 runs the CFG pair)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default: off)")
    p.add_argument(
        "--num-draft-tokens", type=int, default=None, help="drafts per step; default: the family's (MAR 4, others 8)"
    )
    p.add_argument(
        "--features",
        default="vq-encoder",
        help="FID features: vq-encoder (offline default), torchscript:PATH, or clip (the --clip-model image tower)",
    )
    p.add_argument(
        "--clip-model",
        default=None,
        help="open_clip model name, or an open_clip model-config .json file, for CLIP score (with --clip-weights)",
    )
    p.add_argument("--clip-weights", default=None, help="path to the open_clip weights file")
    p.add_argument("--output-dir", type=Path, default=Path("outputs/eval"), help="report.json and grid.png")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_device(p)
    for family in load_families().values():
        if family.evaluate is not None and family.add_eval_args is not None:
            family.add_eval_args(p.add_argument_group(f"{family.name} ({family.description})"))


@command("eval", _eval_args)
def evaluate(args: argparse.Namespace) -> int:
    """Quality next to speed: each method vs its own baseline on the same seeds (TVD, FID, CLIP, grid)."""
    import torch

    from ..training.settings import check_at_least
    from .generators import class_ids

    family, path = _choose_model(args)
    if family.evaluate is None:
        raise SystemExit(f"error: mmspec eval does not support {family.name} models yet")
    check_at_least(args, {"num_images": 1, "batch_size": 1, "threads": 1})  # --threads None: torch's default
    if args.classes is not None:
        try:
            class_ids(args.classes)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
    if args.features.startswith("torchscript:") and not Path(args.features.split(":", 1)[1]).is_file():
        raise SystemExit(f"error: --features {args.features}: no such file")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    pipe = family.load(args, path, device, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    try:  # settings the pipeline refuses (e.g. a video length that is not whole blocks): its message, no traceback
        return family.evaluate(pipe, args, device)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def _caption_args(p: argparse.ArgumentParser) -> None:
    from .jobs_io import DEFAULT_MAX_IMAGE_SIDE

    p.add_argument(
        "inputs",
        type=Path,
        nargs="+",
        help="image files, folders of images, or text files with one image path per line (any mix)",
    )
    p.add_argument(
        "--model", default=None, help="an HF VLM checkpoint folder (default: the embedded reference captioner)"
    )
    p.add_argument("--prompt", default="What is in the image?", help="the question asked about every image")
    p.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="captions.jsonl (grows as the job runs), results/errors.<rank>.jsonl, stats.json (rerun to "
        "resume); without it, 'path<TAB>caption' lines go to stdout and bad images to stderr",
    )
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (decoded a batch at a time)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="caption length limit, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (None: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus threshold in (0, 1] (1: off)")
    p.add_argument("--seed", type=int, default=0, help="batch b uses seed + index of its first item")
    p.add_argument(
        "--drafter",
        default="default",
        help="a VLM method of `mmspec methods` (model: the model's own drafter; ngram: prompt lookup), "
        "'default' (model if the model has a drafter, else the baseline) or 'none' (the baseline)",
    )
    p.add_argument(
        "--drafter-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the drafter's method (repeatable), e.g. path=DIR for --drafter eagle3",
    )
    p.add_argument("--num-draft-tokens", type=int, default=4, help="drafts per step")
    p.add_argument("--acceptance", default="exact", help="acceptance rule: exact, greedy, ...")
    p.add_argument(
        "--max-image-side",
        type=int,
        default=DEFAULT_MAX_IMAGE_SIDE,
        help="larger images are skipped as bad items, from their header, before decoding (the chat demo's limit)",
    )
    add_device(p)


@command("caption", _caption_args)
def caption(args: argparse.Namespace) -> int:
    """Caption a folder or list of images to JSONL (resumable; unreadable images skipped and reported)."""
    import torch

    from ..data.images import image_list
    from ..pipelines.vlm.pipeline_vlm import VLM_METHODS
    from .job_settings import check_caption_settings
    from .jobs import JobOutput, job_state, lock_output, parse_key_values, report, run_job, write_summary
    from .jobs_io import append_jsonl, check_image, load_image, write_atomic

    check_caption_settings(args, ["default", "none", *VLM_METHODS.names()])
    drafter_options = parse_key_values(args.drafter_option, "--drafter-option")
    images = _caption_inputs(args.inputs, image_list)
    if not images:
        raise SystemExit(f"error: no images in {', '.join(str(p) for p in args.inputs)}")
    device = resolve_device(args.device)
    # A second job on the output folder stops here, before loading (stdout mode has no folder to share).
    lock = lock_output(args.output_dir) if args.output_dir is not None else contextlib.nullcontext()
    if args.model:
        from ..pipelines.vlm import VLMPipeline

        try:
            pipe = VLMPipeline.from_pretrained(args.model, device=device)
        except (OSError, ValueError) as err:
            raise SystemExit(f"error: --model {args.model}: {err}") from None
    else:
        from .defaults import load_default_captioner

        pipe = load_default_captioner(device)
    available = pipe.methods.available(pipe)
    speculative = {"default": "model" if "model" in available else None, "none": None}.get(args.drafter, args.drafter)
    method = pipe.methods.get(speculative) if speculative is not None else None
    if method is not None and method.missing(pipe):
        raise SystemExit(f"error: --drafter {args.drafter}: this model lacks {method.missing(pipe)}")
    missing_options = [name for name in (method.needs_options if method else ()) if name not in drafter_options]
    if missing_options:
        raise SystemExit(
            f"error: --drafter {args.drafter} needs " + ", ".join(f"--drafter-option {n}=..." for n in missing_options)
        )
    try:  # the drafter is built once (its options checked here, not per image)
        drafter = None if method is None else method.build(pipe, method.resolve_options(drafter_options))
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: --drafter {args.drafter}: {err}") from None
    num_draft_tokens = args.num_draft_tokens if drafter is not None else 0
    try:  # limits of this model (positions, vocabulary), checked once instead of failing every image
        from ..pipelines.validation import check_vlm_call
        from ..sampling import SamplingConfig

        check_vlm_call(pipe, max_new_tokens=args.max_new_tokens, num_draft_tokens=num_draft_tokens)
        sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        sampling.validate_vocab(pipe.target.vocab_size)
        rule = pipe.resolve_speculation(None, None, args.acceptance).rule  # built once, as every batch will
        if rule.requires_greedy and not sampling.greedy:
            raise ValueError(f"--acceptance {args.acceptance} needs greedy decoding: add --temperature 0")
    except (ValueError, TypeError) as err:
        raise SystemExit(f"error: {err}") from None

    def parse(path: str) -> str:
        return check_image(path, args.max_image_side)  # the header only: pixels are decoded a batch at a time

    def process(items):
        pictures = [load_image(it.value, args.max_image_side) for it in items]
        out = pipe(
            [[picture] for picture in pictures],
            [args.prompt] * len(items),
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=torch.Generator(device).manual_seed(args.seed + items[0].index),
            drafter=drafter,
            num_draft_tokens=num_draft_tokens,
            acceptance=args.acceptance,
        )
        return [
            {
                "caption": text,
                "tokens": int(n),
                "row_steps": int(out.stats.row_steps[i]),
                "row_accepted": int(out.stats.row_accepted[i]),
            }
            for i, (text, n) in enumerate(zip(out.text, out.lengths))
        ]

    if args.output_dir is None:  # print path<TAB>caption; the job's files go to a scratch folder
        import tempfile

        with tempfile.TemporaryDirectory(prefix="mmspec-caption-") as scratch:
            run_job(images, parse, process, Path(scratch), args.batch_size, desc="caption")
            for r in JobOutput.read(Path(scratch), "results"):
                print(f"{r['input']}\t{r['caption']}")
            for e in JobOutput.read(Path(scratch), "errors"):
                print(f"{e['input']}: {e['error']}", file=sys.stderr)
            return _job_exit_code(write_summary(Path(scratch), {}))
    captions_path = args.output_dir / "captions.jsonl"

    def write_captions(records):  # visible while the job runs; rewritten in input order at the end
        append_jsonl(captions_path, [{"image": r["input"], "caption": r["caption"]} for r in records])

    with lock:
        settings = {  # what makes the captions what they are: a resumed job must not change them
            "command": "caption",
            "model": args.model or "embedded",
            "prompt": args.prompt,
            "drafter": args.drafter,
            "num_draft_tokens": args.num_draft_tokens,
            "acceptance": args.acceptance,
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "top_k": args.top_k,
            "top_p": args.top_p,
            "seed": args.seed,
            "batch_size": args.batch_size,
        }
        job = run_job(
            images,
            parse,
            process,
            args.output_dir,
            args.batch_size,
            desc="caption",
            on_results=write_captions,
            settings=settings,
        )
        if job_state().is_main_process:
            results = JobOutput.read(args.output_dir, "results")
            write_atomic(
                captions_path,
                "".join(json.dumps({"image": r["input"], "caption": r["caption"]}) + "\n" for r in results),
            )
            summary = report(
                args.output_dir,
                job,
                "captions",
                {
                    "command": "caption",
                    "prompt": args.prompt,
                    "drafter": args.drafter,
                    "num_draft_tokens": args.num_draft_tokens,
                    "device": str(device),
                },
            )
            return _job_exit_code(summary)
    return 0


def _caption_inputs(inputs: list[Path], image_list: Callable[[Path], list[str]]) -> list[str]:
    """Image paths from ``mmspec caption``'s arguments: an image file is itself (by its suffix, or
    because it is not text), a folder / a list file is expanded (:func:`mmspec.data.images.image_list`)."""
    from ..data.images import IMAGE_SUFFIXES

    paths: list[str] = []
    for path in inputs:
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            paths.append(str(path))
            continue
        if path.is_file():
            try:
                path.read_text()
            except UnicodeDecodeError:  # binary: an image with an unusual name, not a list file
                paths.append(str(path))
                continue
        try:
            paths += image_list(path)
        except FileNotFoundError as err:
            raise SystemExit(f"error: {err}") from None
    return paths


def _train_drafter_args(p: argparse.ArgumentParser) -> None:
    from ..training.eagle import add_train_drafter_args
    from ..training.eagle3 import add_train_eagle3_args
    from ..training.vlm import add_train_vlm_drafter_args

    add_train_drafter_args(p)
    add_train_vlm_drafter_args(p)
    add_train_eagle3_args(p)


def _train_vlm_drafter(args: argparse.Namespace) -> int:
    from ..training.vlm import train_vlm_drafter_command

    return train_vlm_drafter_command(args)


#: --target-kind values trained by their own command (vision-aware VLM drafters: online distillation).
TRAIN_DRAFTER_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"vlm": _train_vlm_drafter}


@command("train-drafter", _train_drafter_args)
def train_drafter(args: argparse.Namespace) -> int:
    """Train a draft head by self-distillation: EAGLE for LMs and LlamaGen, vision-aware EAGLE
    drafters (none/full/pool/prune/vispec/flash/specvlm) for VLMs; progress, checkpoints, resume."""
    from ..training.eagle import TARGET_KINDS, train_drafter_command
    from ..training.settings import check_train_drafter_settings

    # Checked here, where every kind's command is known, before any of them loads a target.
    check_train_drafter_settings(args, sorted([*TARGET_KINDS, *TRAIN_DRAFTER_COMMANDS]))
    if args.arch == "eagle3":
        from ..training.eagle3 import train_eagle3_command

        return train_eagle3_command(args)
    return TRAIN_DRAFTER_COMMANDS.get(args.target_kind, train_drafter_command)(args)


def _export_drafter_args(p: argparse.ArgumentParser) -> None:
    from .export import add_export_args

    add_export_args(p)


@command("export-drafter", _export_drafter_args)
def export_drafter(args: argparse.Namespace) -> int:
    """Write a trained EAGLE-3 drafter in the on-disk format vLLM and SGLang load (--format eagle3)."""
    from .export import export_drafter_command

    return export_drafter_command(args)


def _train_reference_args(p: argparse.ArgumentParser) -> None:
    from ..training.reference import add_train_reference_args

    add_train_reference_args(p)


@command("train-reference", _train_reference_args)
def train_reference(args: argparse.Namespace) -> int:
    """Train the reference models (VQ tokenizer, LlamaGen target and draft GPT) on the emoji data."""
    from ..training.reference import train_reference_command

    return train_reference_command(args)


def _train_video_args(p: argparse.ArgumentParser) -> None:
    from ..training.video import add_train_video_args

    add_train_video_args(p)


@command("train-video", _train_video_args)
def train_video(args: argparse.Namespace) -> int:
    """Train the video reference models (frame VAE, block-causal target and draft) on emoji clips."""
    from ..training.video import train_video_command

    return train_video_command(args)


def _train_captioner_args(p: argparse.ArgumentParser) -> None:
    from ..training.captioner_cli import add_train_captioner_args

    add_train_captioner_args(p)


@command("train-captioner", _train_captioner_args)
def train_captioner(args: argparse.Namespace) -> int:
    """Train the reference captioner (a small LLaVA model and its drafter) on the emoji data."""
    from ..training.captioner_cli import train_captioner_command

    return train_captioner_command(args)


def _demo_args(p: argparse.ArgumentParser) -> None:
    from .demos import add_demo_args

    add_demo_args(p)


@command("demo", _demo_args)
def demo(args: argparse.Namespace) -> int:
    """Launch a Gradio demo (image generation or visual chat) on 127.0.0.1."""
    from .demos import demo_command

    return demo_command(args)


def _methods_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--markdown", action="store_true", help="print the Markdown of docs/methods.md")


@command("methods", _methods_args)
def methods(args: argparse.Namespace) -> int:
    """List every pipeline's speculative methods and every acceptance rule (from the registries)."""
    from .registry_docs import methods_markdown

    text = methods_markdown()
    print(text if args.markdown else text.replace("`", ""), end="")
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except where its help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # identity, not equality: a default of 0 (e.g. --seed) == False, and must still be shown
        unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if "default" in text.lower() or unset or not action.option_strings:
            return text
        if action.default == "":
            return f"{text} (default: empty)"  # not a blank "(default: )"
        return super()._get_help_string(action)


def _describe_missing_help(parser: argparse.ArgumentParser) -> None:
    """Options defined without help text (the training commands') still show their default."""
    for action in parser._actions:
        if action.help is None and action.option_strings:
            action.help = action.dest.replace("_", " ")


def _version() -> str:
    from .. import __version__

    return f"mmspec {__version__}"


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``mmspec`` parser. With ``argv``, only the subcommand it names gets its arguments (their
    definitions import heavy modules); without, every subcommand does."""
    parser = argparse.ArgumentParser(
        prog="mmspec",
        description="Speculative decoding for multimodal generative models.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = None if argv is None else next((a for a in argv if not a.startswith("-")), None)
    for name, (add_args, run) in COMMANDS.items():
        summary = " ".join((run.__doc__ or "").split("\n\n")[0].split())  # the docstring's first paragraph
        p = sub.add_parser(name, help=summary, description=run.__doc__, formatter_class=HelpFormatter)
        if argv is None or name == chosen:
            add_args(p)
            _describe_missing_help(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return args._run(args)
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """End a data-parallel run (``torchrun`` / ``accelerate launch``) by destroying its process group:
    a gloo group left to the interpreter's exit sometimes aborts a rank after the work is done
    ("terminate called without an active exception", seen in the two-process training test)."""
    if "torch" not in sys.modules:  # commands that never imported torch started no group
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
