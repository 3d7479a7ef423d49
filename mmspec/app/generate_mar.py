"""The MAR family of ``mmspec generate`` / ``mmspec eval`` (class-conditional images from continuous
tokens; the embedded emoji pair ``mar-emoji`` or a saved :class:`~mmspec.pipelines.mar.MARPipeline`
folder). See :mod:`mmspec.app.generators`.

Methods come from :data:`~mmspec.pipelines.mar.MAR_METHODS` (``none`` = the MAR baseline, ``cspd``);
``--num-draft-tokens`` is CSpD's γ (AR steps drafted per verification); rules ``gaussian-exact``
(default) and the lossy ``gaussian-tempered``. MAR's head has no greedy mode and no top-k/top-p.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from .generators import (
    CLASS_LABELS,
    BatchRun,
    FamilyJob,
    GenerationFamily,
    eval_labels,
    register_family,
    save_image_result,
)


def _methods():
    from ..pipelines.mar import MAR_METHODS

    return MAR_METHODS


def _add_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--num-iter", type=int, default=16, help="MAR: AR steps (cosine mask schedule)")
    group.add_argument(
        "--cfg-schedule", choices=("linear", "constant"), default="linear", help="MAR: guidance schedule over steps"
    )


def _check_args(args: argparse.Namespace) -> None:
    if args.num_iter < 1:
        raise SystemExit(f"error: --num-iter must be >= 1, got {args.num_iter}")
    if not args.temperature > 0:
        raise SystemExit(
            f"error: MAR's diffusion head has no greedy mode: --temperature must be > 0, got {args.temperature}"
        )
    if args.top_k is not None or getattr(args, "top_p", 1.0) != 1.0:
        raise SystemExit("error: --top-k / --top-p do not apply to MAR (continuous tokens)")


def _load(args: argparse.Namespace, path: Path | None, device, dtype):
    """float32 always: CSpD's density ratios want it and the CPU has no fast half path."""
    from .defaults import load_default_mar, load_mar_folder

    _check_args(args)  # eval reaches here without the generate-time check
    try:
        return load_default_mar(device) if path is None else load_mar_folder(path, device)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: --model {path or 'mar'}: {err}") from None


def _call(
    pipe: Any, args: argparse.Namespace, speculative: str | None, acceptance, acceptance_options, speculative_options
) -> dict:
    """``MARPipeline.__call__`` settings of a job, checked against ``pipe`` (``ValueError``)."""
    if args.num_iter > pipe.target.seq_len:
        raise ValueError(f"--num-iter {args.num_iter} exceeds the model's {pipe.target.seq_len} tokens")
    spec = pipe.resolve_speculation(speculative, speculative_options or None, acceptance, acceptance_options or None)
    return {
        "num_iter": args.num_iter,
        "cfg_schedule": args.cfg_schedule,
        "guidance_scale": args.guidance_scale,
        "temperature": args.temperature,
        "speculative": speculative,
        "num_draft_tokens": args.num_draft_tokens,
        "acceptance": spec.rule,
        "speculative_options": speculative_options or None,
    }


def _prepare(pipe: Any, args: argparse.Namespace, device) -> FamilyJob:
    import torch

    from .jobs import parse_key_values

    acceptance_options = parse_key_values(args.acceptance_option, "--acceptance-option")
    speculative_options = parse_key_values(args.speculative_option, "--speculative-option")
    speculative = None if args.speculative == "none" else args.speculative
    call = _call(pipe, args, speculative, args.acceptance, acceptance_options, speculative_options)
    num_classes = pipe.target.config.class_num

    def parse(value: str) -> int:
        try:
            label = int(value)
        except ValueError:
            raise ValueError(f"not a class id: {value!r}") from None
        if not 0 <= label < num_classes:
            raise ValueError(f"class id {label} is outside [0, {num_classes})")
        return label

    def process(items) -> list[dict]:
        start = time.perf_counter()
        seed = args.seed + items[0].index
        out = pipe(class_labels=[it.value for it in items], generator=torch.Generator(device).manual_seed(seed), **call)
        batch = BatchRun(out.stats, seed, time.perf_counter() - start, (pipe.target.seq_h, pipe.target.seq_w))
        mar_fields = {  # steps = target MAE forwards of the batch (pre-fill included)
            "batch_draft_steps": getattr(out.stats, "draft_steps", 0),
            "batch_acceptance_rate": out.stats.draft_acceptance_rate,
        }
        return [
            {**save_image_result(args, batch, row, item, image, name, {"class_label": item.value}), **mar_fields}
            for row, (item, image) in enumerate(zip(items, out.images))
            for name in [f"{item.index:05d}_class{item.value}.png"]
        ]

    settings = {  # what makes the images what they are: a resumed job must not change them
        "command": "generate",
        "family": "mar",
        "model": args.model or "mar-emoji",
        **{k: v for k, v in call.items() if k != "acceptance"},
        "acceptance": repr(call["acceptance"]),
        "seed": args.seed,
        "batch_size": args.batch_size,
    }
    summary = {
        **{k: v for k, v in settings.items() if k not in ("command", "family")},
        "acceptance": call["acceptance"].name,
        "acceptance_options": acceptance_options,
        "device": str(device),
    }
    return FamilyJob(parse=parse, process=process, settings=settings, summary=summary)


def evaluate_mar(
    pipe: Any,
    methods: list,
    class_labels: list[int],
    sampling: dict,
    seed: int = 0,
    batch_size: int = 16,
    features: Any = None,
    out_dir: Path | None = None,
) -> dict:
    """Quality next to speed for MAR: the baseline, its noise floor (the baseline on other seeds),
    the baseline at ``num_iter / gamma`` (what CSpD's target resembles, so an honest comparison has
    it) and every method (:class:`~mmspec.app.evaluation.EvalMethod`, e.g. ``cspd`` and
    ``cspd:gaussian-tempered:lam=42``) on the same labels and seeds: target forwards, acceptance
    rate, wall time, FID vs the baseline (through the family-generic
    :func:`~mmspec.app.evaluation.evaluate_llamagen`).

    Args:
        sampling: ``MARPipeline.__call__`` settings shared by all runs (``num_iter``,
            ``guidance_scale``, ``cfg_schedule``, ``temperature``, ``num_draft_tokens``).
        features: FID features; default the embedded LlamaGen reference's VQ encoder
            (:class:`~mmspec.app.evaluation.VQEncoderFeatures`), the offline extractor of
            ``mmspec eval``: trained on the same emoji data, independent of the MAR under test.
    """
    from .defaults import load_default_llamagen
    from .evaluation import EvalMethod, VQEncoderFeatures, evaluate_llamagen

    if features is None:
        features = VQEncoderFeatures(load_default_llamagen().vq)
    fewer = max(sampling["num_iter"] // sampling["num_draft_tokens"], 1)
    baselines = []
    if fewer < sampling["num_iter"]:
        baselines.append(EvalMethod(f"baseline num_iter={fewer}", None, sampling={"num_iter": fewer}))
    return evaluate_llamagen(
        pipe,
        baselines + list(methods),
        class_labels,
        seed=seed,
        batch_size=batch_size,
        features=features,
        sampling=sampling,
        out_dir=out_dir,
    )


def _evaluate(pipe: Any, args: argparse.Namespace, device) -> int:
    from .evaluation import EvalMethod, TorchScriptFeatures, format_report

    try:  # every spec is checked before the first image
        methods = [EvalMethod.parse(m) for m in (args.method or ["cspd", "cspd:gaussian-tempered"])]
        for method in methods:
            if method.speculative is not None and method.speculative not in _methods():
                raise ValueError(f"{method.speculative!r} is not a MAR method ({', '.join(_methods().names())})")
            _call(
                pipe, args, method.speculative, method.acceptance, method.acceptance_options, method.speculative_options
            )
    except (ValueError, TypeError) as err:
        raise SystemExit(f"error: --method: {err}") from None
    if args.features == "vq-encoder":
        features = None  # evaluate_mar's default: the embedded LlamaGen VQ encoder
    elif args.features.startswith("torchscript:"):
        features = TorchScriptFeatures(args.features.split(":", 1)[1])
    else:
        raise SystemExit(f"error: --features for MAR must be vq-encoder or torchscript:PATH, got {args.features!r}")
    num_classes = pipe.target.config.class_num
    labels = eval_labels(args.classes, num_classes, args.num_images)
    sampling = {
        "num_iter": args.num_iter,
        "cfg_schedule": args.cfg_schedule,
        "guidance_scale": args.guidance_scale,
        "temperature": args.temperature,
        "num_draft_tokens": args.num_draft_tokens,
    }
    report = evaluate_mar(
        pipe,
        methods,
        labels,
        sampling,
        seed=args.seed,
        batch_size=args.batch_size,
        features=features,
        out_dir=args.output_dir,
    )
    print(format_report(report))
    print(f"\nwrote {args.output_dir / 'report.json'} and {args.output_dir / 'grid.png'}")
    return 0


MAR_FAMILY = register_family(
    GenerationFamily(
        name="mar",
        description="class-conditional MAR images from continuous tokens (the embedded emoji pair, saved folders)",
        pipeline_class="MARPipeline",
        inputs=CLASS_LABELS,
        methods=_methods,
        load=_load,
        prepare=_prepare,
        default_method="cspd",
        default_num_draft_tokens=4,  # γ: the README's, the bench's and the CSpD paper's batch-1 setting
        embedded="mar-emoji",
        add_args=_add_args,
        check_args=_check_args,
        evaluate=_evaluate,
        add_eval_args=_add_args,
        reads=("heatmaps",),
    )
)
