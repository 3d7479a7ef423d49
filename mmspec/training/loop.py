"""The training loop shared by mmspec's recipes (reference models, captioners, EAGLE heads).

* :class:`TrainRun` + :func:`run_training`: one optimiser step per call of a step function, a tqdm
  bar, checkpoints every ``config.checkpoint_every`` steps and at the end (model, optimiser,
  scheduler, step, data generator and torch RNG states), and resumption from the latest one with
  ``config.resume``; a resumed run ends bit for bit where an uninterrupted one does (same device and
  thread count). A checkpoint records the settings it was written with (:func:`config_fingerprint`)
  and refuses to resume a run with other settings.
* :func:`train_head`: the draft-head loop shared by EAGLE heads (LMs, LlamaGen) and the
  vision-aware VLM heads: AdamW, a loss per step from a step function, gradient clipping,
  checkpoints (:func:`save_head_checkpoint`) and resumption (:func:`resume_head_training`), and
  optionally data parallelism under ``accelerate launch`` (:func:`process_state`).
* :func:`save_state` / :func:`latest_checkpoint`: the checkpoint files themselves
  (``step-NNNNNNN.pt``, written atomically).
* :func:`cosine_schedule`, :func:`param_groups`, :func:`clip_and_step`: LlamaGen's optimisation
  recipe (linear warm-up then cosine decay; weight decay on matrices and embeddings only; gradient
  clipping).

``config`` is any dataclass with ``steps``, ``checkpoint_dir``, ``checkpoint_every``, ``resume`` and
``progress`` fields (e.g. :class:`~mmspec.training.reference_gpt.GPTTrainConfig`; :func:`train_head` also
reads ``lr`` and ``grad_clip``, e.g. :class:`~mmspec.training.eagle.EagleTrainConfig`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..checkpoint_io import read_torch

#: Fields of a training configuration that say where or how a run is saved, not what it computes.
RUN_CONTROL_FIELDS = ("checkpoint_dir", "checkpoint_every", "resume", "progress")


def cosine_schedule(steps: int, warmup_steps: int, floor: float = 0.1) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine decay to ``floor`` at ``steps``."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(steps - warmup_steps, 1)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return multiplier


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """LlamaGen's split: decay matrices and embeddings, not norms (1-D parameters)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def config_fingerprint(config: Any) -> dict[str, Any]:
    """The settings a checkpoint must agree with to be resumed (not where or how it is saved)."""
    settings = dataclasses.asdict(config)
    for key in RUN_CONTROL_FIELDS:
        settings.pop(key, None)
    # JSON round trip: tuples and lists compare equal after a checkpoint is loaded.
    return json.loads(json.dumps(settings))


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint with the highest step in ``directory`` (``step-NNNNNNN.pt``), or None."""
    found = sorted(Path(directory).glob("step-*.pt"))
    return found[-1] if found else None


def save_state(directory: str | Path, step: int, state: dict[str, Any], keep: int | None = 2) -> Path:
    """Write ``state`` as ``directory/step-NNNNNNN.pt`` atomically (an interrupted save never becomes
    the latest checkpoint) and delete all but the newest ``keep`` checkpoints (None: keep all)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{step:07d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    if keep is not None:
        for old in sorted(directory.glob("step-*.pt"))[:-keep]:
            old.unlink()
    return path


@dataclass
class TrainRun:
    """What :func:`run_training` checkpoints and restores; ``extra`` holds stage-specific tensors
    (e.g. a VQ's code-usage counters)."""

    name: str
    config: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def state(self, step: int) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit after optimiser step ``step``."""
        return {
            "step": step,
            "config": config_fingerprint(self.config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "extra": self.extra,
        }

    def restore(self, path: Path) -> int:
        """Load a checkpoint written by :meth:`save`; returns its step."""
        state = read_torch(path)
        if state["config"] != config_fingerprint(self.config):
            raise ValueError(
                f"cannot resume {self.name} from {path}: it was written with different settings "
                f"({state['config']}); use another checkpoint_dir or the same configuration"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        for key, value in state["extra"].items():
            self.extra[key].copy_(value)
        return int(state["step"])

    def save(self, directory: Path, step: int, keep: int = 2) -> None:
        """Write ``step-NNNNNNN.pt`` and delete all but the newest ``keep`` checkpoints."""
        save_state(directory, step, self.state(step), keep)


def run_training(run: TrainRun, step_fn: Callable[[int], dict[str, float]]) -> None:
    """Run ``step_fn(step)`` (one optimiser step, returning metrics for the progress bar) up to
    ``config.steps``, with checkpoints, and from the latest checkpoint when ``config.resume``."""
    config = run.config
    directory = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    start = 0
    if config.resume and directory is not None and latest_checkpoint(directory) is not None:
        start = run.restore(latest_checkpoint(directory))
    run.model.train()
    # Training must not depend on the caller's grad mode (e.g. a surrounding torch.no_grad()).
    bar = tqdm(total=config.steps, initial=start, desc=run.name, disable=not config.progress)
    with torch.enable_grad(), bar:
        for step in range(start, config.steps):
            metrics = step_fn(step)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
            done = step + 1
            periodic = config.checkpoint_every and done % config.checkpoint_every == 0
            if directory is not None and (periodic or done == config.steps):
                run.save(directory, done)
    run.model.eval()


def clip_and_step(run: TrainRun, loss: torch.Tensor, grad_clip: float) -> None:
    """Backward, gradient-norm clip, optimiser and scheduler step."""
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), grad_clip)
    run.optimizer.step()
    run.scheduler.step()


# ---------------------------------------------------------------------- draft heads
def process_state():
    """This process's place in a data-parallel run (``accelerate launch`` / ``torchrun``): accelerate's
    ``PartialState``, asked for the CPU backend when there is no GPU (without it, CPU processes
    launched together do not see each other)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def save_head_checkpoint(directory: Path, step: int, head: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write the head, optimiser, step and global RNG state (:func:`save_state`)."""
    state = {
        "step": step,
        "head": head.state_dict(),
        "optimizer": optimizer.state_dict(),
        # The global RNG state, so that batch callables drawing from it also resume identically.
        "torch_rng": torch.get_rng_state(),
    }
    save_state(directory, step, state)


def resume_head_training(config: Any, head: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """With ``config.resume``, load the head, optimizer and RNG state of the latest checkpoint in
    ``config.checkpoint_dir`` (written by :func:`save_head_checkpoint`); return the step to start from."""
    if not config.resume:
        return 0
    if config.checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    latest = latest_checkpoint(config.checkpoint_dir)
    if latest is None:
        return 0
    state = read_torch(latest)
    head.load_state_dict(state["head"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"]


def train_head(
    head: torch.nn.Module,
    config: Any,
    step_loss: Callable[[int], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    desc: str,
    data_parallel: bool = False,
) -> list[float]:
    """Train a draft head (in place) for ``config.steps`` AdamW steps; returns this call's per-step
    losses (this process's).

    ``step_loss(index)`` draws the data of ``index`` (the teacher under ``torch.no_grad()``) and
    returns ``(loss, parts)`` with the loss's graph built (``parts["feature_loss"]`` is shown on the
    progress bar). Without ``data_parallel`` the index is the step; with it, every process of an
    ``accelerate launch`` starts from the main process's weights, draws index
    ``step * num_processes + rank`` and averages gradients before each step, and only the main
    process writes checkpoints and shows progress (one process behaves exactly as a plain run).
    Checkpoints hold the head, the optimiser, the step and the RNG state; ``config.resume``
    continues from the latest one, so a resumed run ends with the weights of an uninterrupted one
    when the data of an index is fixed.
    """
    num_processes, rank, is_main = 1, 0, True
    if data_parallel:
        state = process_state()
        num_processes, rank, is_main = state.num_processes, state.process_index, state.is_main_process
    if num_processes > 1:  # every process starts from the main process's weights
        from accelerate.utils import broadcast

        with torch.no_grad():
            for p in head.parameters():
                p.copy_(broadcast(p.detach().clone(), from_process=0))
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    directory = Path(config.checkpoint_dir) if config.checkpoint_dir is not None else None
    first_step = resume_head_training(config, head, optimizer)
    losses = []
    bar = tqdm(
        range(first_step, config.steps),
        initial=first_step,
        total=config.steps,
        desc=desc,
        disable=not (config.progress and is_main),
    )
    head.train()
    for step in bar:
        with torch.enable_grad():
            loss, parts = step_loss(step * num_processes + rank)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if num_processes > 1:
            from accelerate.utils import reduce

            for p in head.parameters():
                if p.grad is not None:
                    p.grad = reduce(p.grad, "mean")
        torch.nn.utils.clip_grad_norm_(head.parameters(), config.grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))  # one sync per step: logging, outside any decode loop
        bar.set_postfix(loss=f"{losses[-1]:.4f}", feature=f"{float(parts['feature_loss']):.4f}")
        done = step + 1
        checkpoint = done == config.steps or (config.checkpoint_every and done % config.checkpoint_every == 0)
        if directory is not None and checkpoint and is_main:
            save_head_checkpoint(directory, done, head, optimizer)
    head.eval()
    return losses


def add_recipe_run_args(parser: argparse.ArgumentParser, saved: str, evaluation: str) -> None:
    """The run arguments every recipe command shares (``train-reference``, ``train-captioner``):
    checkpoint interval, resume, threads, device, storage dtype of ``saved`` (what the recipe writes),
    skipping ``evaluation`` (what it evaluates), progress bars."""
    parser.add_argument("--checkpoint-every", type=int, default=None, help="override the preset's checkpoint interval")
    parser.add_argument("--resume", action="store_true", help="continue each stage from its latest checkpoint")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the models train (default: cuda when available); evaluation runs on the CPU",
    )
    parser.add_argument(
        "--save-dtype", choices=("float32", "float16"), default="float32", help=f"storage dtype of {saved}"
    )
    parser.add_argument("--no-eval", action="store_true", help=f"skip {evaluation}")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
