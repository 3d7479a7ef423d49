"""Reading the files of a saved model (safetensors weights, JSON configs, torch ``.pt`` checkpoints)
with one clear error for a file that is there but cannot be read: a ``ValueError`` naming the file
and what is wrong with it. The libraries' own exceptions (``SafetensorError``, ``JSONDecodeError``,
a bare ``EOFError`` from ``torch.load``) name neither, and ``SafetensorError`` is not even a
``ValueError`` or ``OSError``, so the commands, which turn those two into an ``error:`` line, showed
a traceback. A missing file stays an ``OSError`` (``FileNotFoundError``), as before.

torch and safetensors are imported inside the functions: the command line's modules import this one
while building the parser, which must stay fast (``mmspec --help`` imports no torch)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from safetensors import SafetensorError

__all__ = ["check_safetensors_files", "read_json", "read_safetensors", "read_torch", "safetensors_shapes"]

#: How a half-written or damaged file most often comes about; said in every message.
_HINT = "truncated or corrupt?"


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``; ``ValueError`` naming the file, the line and the column when it is
    not valid JSON (or not UTF-8 text)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"cannot read {path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"cannot read {path}: not valid JSON (not UTF-8 text; {_HINT})") from None


def _not_safetensors(path: str | os.PathLike, err: SafetensorError) -> ValueError:
    return ValueError(f"cannot read {path}: not a valid safetensors file ({_HINT} {err})")


def safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the safetensors file ``path``, from its header only (nothing is read
    into memory). safetensors checks the header against the file's size, so a truncated file is
    found here, as a ``ValueError`` naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118  (not a dict)
    except SafetensorError as err:
        raise _not_safetensors(path, err) from None


def read_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path`` (``safetensors.torch.load_file``); ``ValueError``
    naming the file when it is not a valid one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device=device)
    except SafetensorError as err:
        raise _not_safetensors(path, err) from None


def check_safetensors_files(folder: str | os.PathLike) -> None:
    """``ValueError`` naming the first ``*.safetensors`` file directly in ``folder`` whose header is
    unreadable or does not match its size: for loaders (transformers' ``from_pretrained``) that would
    raise ``SafetensorError`` without saying which file."""
    for file in sorted(Path(folder).glob("*.safetensors")):
        safetensors_shapes(file)


def read_torch(path: str | os.PathLike) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; ``ValueError`` naming the file when
    it is not a readable PyTorch checkpoint. A cut-off file raises ``RuntimeError`` (a zip archive
    without its directory) or ``EOFError`` (empty), and other bytes ``UnpicklingError`` or, from the
    legacy format's reader, ``KeyError``."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, KeyError) as err:
        detail = str(err).split("\n")[0] or type(err).__name__
        raise ValueError(f"cannot read {path}: not a readable PyTorch checkpoint ({_HINT} {detail})") from None
