"""``StrictLoadingMixin``: diffusers components whose ``from_pretrained`` refuses a weights file that
does not match the model's config (missing, unexpected or mis-shaped tensors), naming the
component, the folder and the keys; diffusers itself only warns and leaves ``meta`` tensors behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

from mmspec.weights_check import check_weights


class StrictLoadingMixin:
    """Put before ``ModelMixin`` in the bases of a diffusers model class."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        folder = Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "")
        weights = folder / SAFETENSORS_WEIGHTS_NAME
        if folder.is_dir() and weights.is_file() and (folder / "config.json").is_file():
            from safetensors import safe_open

            config = cls.load_config(folder)
            with torch.device("meta"):
                expected = {k: tuple(v.shape) for k, v in cls.from_config(config).state_dict().items()}
            with safe_open(weights, framework="pt") as f:
                found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118  (not a dict)
            check_weights(cls.__name__, str(folder), expected, found)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
