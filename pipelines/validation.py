"""Argument checks shared by the pipelines' ``__call__`` (and by ``mmspec generate`` / ``caption``,
which run them once before a batch job): a wrong type or an impossible value is a ``ValueError``
that names the argument, instead of a silent conversion (``class_labels=[1.7]`` as class 1) or a
cryptic error from deep inside torch or the cache allocator.

Upper bounds come from what the model can use: a LlamaGen image has ``block_size`` tokens, so
drafting more per step is wasted work; a VLM's reply cannot run past its position table.
"""

from __future__ import annotations

import numbers
import os
from typing import Any

import numpy as np
import PIL.Image
import torch


def is_int(value: Any) -> bool:
    """An integer (Python, numpy or a 0-d integer tensor), not a bool."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.dtype.is_floating_point and value.dtype != torch.bool
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None, why: str = "") -> int:
    """``value`` as an int within ``[minimum, maximum]``; ``ValueError`` naming ``name`` otherwise."""
    if not is_int(value):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}={value} is more than {why or 'the limit'}: use at most {maximum}")
    return value


def check_non_negative(name: str, value: Any) -> float:
    """``value`` as a float >= 0 (a guidance scale, a temperature); ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


def check_class_labels(class_labels: Any, num_classes: int) -> torch.Tensor:
    """Class labels (an int, a sequence of ints, an integer array or tensor) as a ``[B]`` long tensor;
    ``ValueError`` for floats, strings, bools, an empty list, nesting or ids outside the classes."""
    if is_int(class_labels):
        labels = [class_labels]
    elif isinstance(class_labels, (torch.Tensor, np.ndarray)):
        if class_labels.ndim != 1:
            raise ValueError(f"class_labels must be one id or a 1-D list of ids, got shape {tuple(class_labels.shape)}")
        labels = list(class_labels)
    elif isinstance(class_labels, (list, tuple)):
        labels = list(class_labels)
    else:
        raise ValueError(f"class_labels must be an int or a list of ints, got {type(class_labels).__name__}")
    if not labels:
        raise ValueError("class_labels is empty: pass at least one class id")
    wrong = [x for x in labels if not is_int(x)]
    if wrong:
        raise ValueError(
            f"class_labels must be integers, got {wrong[:5]!r} (convert strings with int(), and do not "
            "pass fractional ids)"
        )
    ids = [int(x) for x in labels]
    bad = [x for x in ids if not 0 <= x < num_classes]
    if bad:
        raise ValueError(f"class labels {bad} are outside [0, {num_classes})")
    return torch.tensor(ids, dtype=torch.long)


def check_llamagen_call(
    pipe: Any,
    class_labels: Any,
    *,
    speculative: str | None = None,
    num_draft_tokens: Any = 8,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    guidance_scale: float = 4.0,
    **_: Any,
) -> None:
    """The checks :class:`~mmspec.pipelines.llamagen.LlamaGenPipeline` makes before generating."""
    from mmspec.sampling import SamplingConfig

    config = pipe.target.config
    if class_labels is not None and config.model_type == "c2i":
        check_class_labels(class_labels, config.num_classes)
    if top_k is not None and not is_int(top_k):
        raise ValueError(
            f"top_k must be a positive integer (leave it unset, None, for no top-k filtering), got {top_k!r}"
        )
    SamplingConfig(
        temperature=temperature, top_k=None if top_k is None else int(top_k), top_p=top_p, guidance_scale=guidance_scale
    ).validate_vocab(config.vocab_size)
    if speculative is not None:
        check_int(
            "num_draft_tokens", num_draft_tokens, 1, config.block_size, f"the {config.block_size} tokens of an image"
        )


def check_vlm_call(pipe: Any, *, max_new_tokens: Any, num_draft_tokens: Any, prompt_length: int | None = None) -> None:
    """The checks :class:`~mmspec.pipelines.vlm.VLMPipeline` makes before generating
    (``prompt_length``: the longest prompt in tokens, once known)."""
    limit = max_positions(pipe.target)
    check_int("max_new_tokens", max_new_tokens, 1, limit, f"the model's {limit} positions")
    check_int("num_draft_tokens", num_draft_tokens, 0, limit, f"the model's {limit} positions")  # 0: the baseline
    if prompt_length is not None and limit is not None and prompt_length + int(max_new_tokens) > limit:
        raise ValueError(
            f"the prompt has {prompt_length} tokens, so max_new_tokens={int(max_new_tokens)} would run past "
            f"the model's {limit} positions: use max_new_tokens <= {max(limit - prompt_length, 0)}"
        )


def max_positions(target: Any) -> int | None:
    """The longest sequence a VLM target's language model was built for, or None if unknown."""
    config = getattr(target, "config", None)
    text = getattr(config, "text_config", config)
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if is_int(value) else None


#: What a VLM pipeline accepts as one image.
IMAGE_TYPES = (PIL.Image.Image, str, os.PathLike, np.ndarray, torch.Tensor)


def is_single_image(value: Any) -> bool:
    return isinstance(value, IMAGE_TYPES)


def array_to_pil(image: np.ndarray | torch.Tensor, name: str) -> PIL.Image.Image:
    """An image array as transformers' processors take it: ``[H, W]``, ``[H, W, C]`` or ``[C, H, W]``
    (C = 1, 3 or 4), uint8 in [0, 255] or floats in [0, 1]."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # channels first -> last
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"{name}: an image array must be [H, W], [H, W, C] or [C, H, W] with C in (1, 3, 4), got shape "
            f"{tuple(image.shape)}"
        )
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name}: an image array must hold numbers, got {array.dtype}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(f"{name}: a float image array must hold values in [0, 1]")
        array = (array * 255).round()
    elif array.min() < 0 or array.max() > 255:
        raise ValueError(f"{name}: an integer image array must hold values in [0, 255]")
    return PIL.Image.fromarray(array.astype(np.uint8)).convert("RGB")
