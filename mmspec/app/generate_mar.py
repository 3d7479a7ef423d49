"""MAR's part of ``mmspec generate`` / ``mmspec eval``: how to load a MAR pipeline for ``--model``,
check its call settings once before a job, and generate a batch of class labels into image files
through the generic job machinery (:func:`mmspec.app.jobs.run_job`: batches, resume, sharding,
bad items, ``stats.json``).

``--model``: ``mar`` or ``mar-emoji`` (the embedded reference pair, :func:`load_default_mar`) or a
saved :class:`~mmspec.pipelines.mar.MARPipeline` folder (``model_index.json`` names
``MARPipeline``). Methods come from :data:`~mmspec.pipelines.mar.MAR_METHODS` (``none`` = the
baseline, ``cspd``); rules from the engine's registry (``gaussian-exact``, ``gaussian-tempered``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .defaults import default_mar_path, load_default_mar, load_mar_folder
from .jobs import job_state, lock_output, report, run_job

#: ``--model`` names of the embedded MAR pair.
MAR_DEFAULT_NAMES = ("mar", "mar-emoji")


@dataclass
class MARSettings:
    """The call settings of a MAR job (one per job; checked before any model loads by
    :meth:`check`, against the model by :func:`check_mar_call`)."""

    num_iter: int = 16
    guidance_scale: float = 3.0
    cfg_schedule: str = "linear"
    temperature: float = 1.0
    speculative: str | None = None
    num_draft_tokens: int = 4
    acceptance: str | None = None
    acceptance_options: dict = field(default_factory=dict)
    speculative_options: dict = field(default_factory=dict)

    def check(self) -> None:
        """Settings wrong for every item: ``ValueError`` with the reason (no model needed)."""
        from ..pipelines.mar import MAR_METHODS

        if isinstance(self.num_iter, bool) or not isinstance(self.num_iter, int) or self.num_iter < 1:
            raise ValueError(f"num_iter must be an integer >= 1, got {self.num_iter!r}")
        if self.num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens (CSpD's gamma) must be >= 1, got {self.num_draft_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (MAR's head has no greedy mode), got {self.temperature}")
        if self.guidance_scale < 1:
            raise ValueError(f"guidance_scale must be >= 1 (1 = no guidance), got {self.guidance_scale}")
        if self.cfg_schedule not in ("linear", "constant"):
            raise ValueError(f"cfg_schedule must be 'linear' or 'constant', got {self.cfg_schedule!r}")
        if self.speculative is not None and self.speculative not in MAR_METHODS.names():
            raise ValueError(
                f"unknown MAR method {self.speculative!r}; available: none, {', '.join(MAR_METHODS.names())}"
            )

    def call_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``MARPipeline.__call__``."""
        return {
            "num_iter": self.num_iter,
            "guidance_scale": self.guidance_scale,
            "cfg_schedule": self.cfg_schedule,
            "temperature": self.temperature,
            "speculative": self.speculative,
            "num_draft_tokens": self.num_draft_tokens,
            "acceptance": self.acceptance,
            "acceptance_options": dict(self.acceptance_options) or None,
            "speculative_options": dict(self.speculative_options) or None,
        }


def load_mar(model: str | None, device: str | torch.device = "cpu"):
    """The MAR pipeline ``--model`` names (None: the embedded pair), float32 on ``device``.

    Raises:
        FileNotFoundError: the folder (or the embedded assets) does not exist.
        ValueError: the folder holds another kind of pipeline.
    """
    if model is None or model in MAR_DEFAULT_NAMES:
        return load_default_mar(device)
    path = Path(model)
    index = path / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"--model {model}: no model_index.json there (not a saved pipeline folder)")
    name = json.loads(index.read_text()).get("_class_name")
    if name != "MARPipeline":
        raise ValueError(f"--model {model} holds a {name}, not a MARPipeline")
    return load_mar_folder(path, device)


def check_mar_call(pipe, settings: MARSettings) -> Any:
    """Check ``settings`` against ``pipe`` once (method and rule build, a drafter for CSpD, the
    schedule fits the token grid); returns the resolved speculation. ``ValueError`` otherwise."""
    if settings.num_iter > pipe.target.seq_len:
        raise ValueError(f"num_iter {settings.num_iter} exceeds the model's {pipe.target.seq_len} tokens")
    return pipe.resolve_speculation(
        settings.speculative,
        dict(settings.speculative_options) or None,
        settings.acceptance,
        dict(settings.acceptance_options) or None,
    )


def parse_class_label(value: str, num_classes: int) -> int:
    """A job item: a class id in ``[0, num_classes)`` (``ValueError`` marks the item bad)."""
    try:
        label = int(value)
    except ValueError:
        raise ValueError(f"not a class id: {value!r}") from None
    if not 0 <= label < num_classes:
        raise ValueError(f"class id {label} is outside [0, {num_classes})")
    return label


def generate_mar(
    raw_labels: list[str],
    output_dir: Path,
    settings: MARSettings,
    model: str | None = None,
    batch_size: int = 16,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> int:
    """``mmspec generate --model mar``: one PNG per class label in ``output_dir`` (``NNNNN_classC.png``),
    results and errors as JSON lines, ``stats.json``; resumable and shardable (``accelerate launch``).
    Batch ``b`` uses ``torch.Generator(device).manual_seed(seed + first index of b)``.

    Settings wrong for every item stop before the model loads (``SystemExit`` with the reason).
    """
    from .cli import save_image_atomic

    try:
        settings.check()
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if not raw_labels:
        raise SystemExit("error: no class labels to generate")
    lock = lock_output(output_dir)  # a second job on this folder stops here, before loading
    try:
        pipe = load_mar(model, device)
        check_mar_call(pipe, settings)
    except (OSError, ValueError) as err:
        lock.release()
        raise SystemExit(f"error: {err}") from None
    pipe.set_progress_bar_config(disable=True)
    num_classes = pipe.target.config.class_num
    call = settings.call_kwargs()

    def process(items):
        start = time.perf_counter()
        batch_seed = seed + items[0].index
        out = pipe(
            class_labels=[it.value for it in items],
            generator=torch.Generator(device).manual_seed(batch_seed),
            **call,
        )
        seconds = time.perf_counter() - start
        records = []
        for row, (item, image) in enumerate(zip(items, out.images)):
            name = f"{item.index:05d}_class{item.value}.png"
            save_image_atomic(image, output_dir / name)
            records.append(
                {
                    "file": name,
                    "class_label": item.value,
                    "seed": batch_seed,
                    "batch_steps": out.stats.steps,  # target MAE forwards of the batch
                    "batch_seconds": seconds,
                    "batch_acceptance_rate": out.stats.draft_acceptance_rate,
                    "row_steps": int(out.stats.row_steps[row]),
                    "row_accepted": int(out.stats.row_accepted[row]),
                }
            )
        return records

    job_settings = {
        "command": "generate",
        "family": "mar",
        "model": model or str(default_mar_path().name),
        **asdict(settings),
        "seed": seed,
        "batch_size": batch_size,
    }
    with lock:
        job = run_job(
            raw_labels,
            lambda value: parse_class_label(value, num_classes),
            process,
            output_dir,
            batch_size,
            desc="generate mar",
            settings=job_settings,
        )
        if job_state().is_main_process:
            report(output_dir, job, "images", {**job_settings, "device": str(device)})
    return 0


def evaluate_mar(
    pipe,
    methods: list,
    class_labels: list[int],
    settings: MARSettings,
    seed: int = 0,
    batch_size: int = 16,
    features=None,
    out_dir: Path | None = None,
) -> dict:
    """``mmspec eval`` for MAR: the baseline, its noise floor (the baseline on other seeds), the
    baseline at ``num_iter / gamma`` (what CSpD's target resembles, so an honest comparison has it)
    and every method (:class:`~mmspec.app.evaluation.EvalMethod`, e.g. ``cspd`` and
    ``cspd:gaussian-tempered:lam=42``) on the same labels and seeds: target forwards, acceptance rate,
    wall time, FID vs the baseline (:func:`~mmspec.app.evaluation.evaluate_llamagen`, which is
    family-generic). ``features`` default: the embedded LlamaGen reference's VQ encoder
    (:class:`~mmspec.app.evaluation.VQEncoderFeatures`), the offline extractor ``mmspec eval`` uses,
    trained on the same emoji data and independent of the MAR under test."""
    from .defaults import load_default_llamagen
    from .evaluation import EvalMethod, VQEncoderFeatures, evaluate_llamagen

    if features is None:
        features = VQEncoderFeatures(load_default_llamagen().vq)
    sampling = settings.call_kwargs()
    for key in ("speculative", "acceptance", "acceptance_options", "speculative_options"):
        sampling.pop(key)  # per method
    gamma = settings.num_draft_tokens
    fewer = max(settings.num_iter // gamma, 1)
    baselines = (
        [EvalMethod(f"baseline num_iter={fewer}", None, sampling={"num_iter": fewer})]
        if fewer < settings.num_iter
        else []
    )
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
