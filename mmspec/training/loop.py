"""The training loop shared by mmspec's recipes (reference models, captioners, EAGLE heads).

* :class:`TrainRun` + :func:`run_training`: one optimiser step per call of a step function, a tqdm
  bar, checkpoints every ``config.checkpoint_every`` steps and at the end (model, optimiser,
  scheduler, step, data generator and torch RNG states), and resumption from the latest one with
  ``config.resume``; a resumed run ends bit for bit where an uninterrupted one does (same device and
  thread count). A checkpoint records the settings it was written with (:func:`config_fingerprint`)
  and refuses to resume a run with other settings.
* :func:`save_state` / :func:`latest_checkpoint`: the checkpoint files themselves
  (``step-NNNNNNN.pt``, written atomically), also used by the EAGLE trainers' own loops.
* :func:`cosine_schedule`, :func:`param_groups`, :func:`clip_and_step`: LlamaGen's optimisation
  recipe (linear warm-up then cosine decay; weight decay on matrices and embeddings only; gradient
  clipping).

``config`` is any dataclass with ``steps``, ``checkpoint_dir``, ``checkpoint_every``, ``resume`` and
``progress`` fields (e.g. :class:`~mmspec.training.reference.GPTTrainConfig`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

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
        state = torch.load(path, map_location="cpu", weights_only=True)
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
