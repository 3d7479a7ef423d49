"""``ComponentMixin``: what mmspec adds to its diffusers model classes (put it before ``ModelMixin``
in the bases).

* ``from_pretrained`` is strict: a weights file that does not match the model's config (missing,
  unexpected or mis-shaped tensors) is a ``ValueError`` naming the component, the folder and the
  keys; diffusers itself only warns and leaves ``meta`` tensors behind, so the first call failed
  with "Tensor.item() cannot be called on meta tensors". A weights file that is not a valid
  safetensors file (truncated, corrupt) is a ``ValueError`` naming it.
* ``.to(dtype)`` is quiet: diffusers warns on every dtype cast that "modules should be kept in
  float32" even when, as here, there are none (``_keep_in_fp32_modules`` is empty).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

from mmspec.checkpoint_io import safetensors_shapes
from mmspec.weights_check import check_weights

_DIFFUSERS_MODELING_LOGGER = "diffusers.models.modeling_utils"


class ComponentMixin:
    """Strict loading and quiet dtype casts for a diffusers ``ModelMixin`` subclass."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        folder = Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "")
        weights = folder / SAFETENSORS_WEIGHTS_NAME
        if folder.is_dir() and weights.is_file() and (folder / "config.json").is_file():
            config = cls.load_config(folder)
            with torch.device("meta"):
                expected = {k: tuple(v.shape) for k, v in cls.from_config(config).state_dict().items()}
            check_weights(cls.__name__, str(folder), expected, safetensors_shapes(weights))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def to(self, *args: Any, **kwargs: Any):
        if getattr(self, "_keep_in_fp32_modules", None):
            return super().to(*args, **kwargs)
        logger = logging.getLogger(_DIFFUSERS_MODELING_LOGGER)
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            return super().to(*args, **kwargs)
        finally:
            logger.setLevel(level)
