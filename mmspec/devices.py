"""Checking a device name before anything is loaded onto it: ``torch.device("cuda")`` succeeds on a
machine without CUDA, and the first tensor moved there fails with an assertion deep inside a model's
loading, so commands resolve their ``--device`` through :func:`available_device`."""

from __future__ import annotations

import torch


def available_device(name: str) -> torch.device:
    """``name`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ...) as a torch device that this
    machine has; ValueError naming what is missing otherwise."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"{name!r} is not a device name ({err})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = (
                "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU found"
            )
            raise ValueError(
                f"{name!r}: CUDA is not available on this machine (torch {torch.__version__}, {build}); use cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{name!r}: this machine has {count} CUDA device(s) (cuda:0 .. cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name!r}: MPS is not available on this machine; use cpu")
    return device
