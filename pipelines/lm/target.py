"""Causal language models from transformers (Llama, Mistral, Qwen2 families) as mmspec targets, and
draft models cut from them.

The HF model is converted with the VLM path's converter (:func:`~..vlm.decoder.convert_language_model`:
static cache, per-row lengths, tree masks, exact RoPE), so a text-only LM runs the same draft/verify
loop as a VLM's language model. Unchanged weight tensors are shared with the HF model, which stays
usable (e.g. for ``generate`` as a peer in benchmarks).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig

from mmspec.checkpoint_io import check_safetensors_files
from mmspec.types import PrefillOutput, TargetOutput, TokenPrompt

from ..vlm.decoder import (
    TEXT_ARCHITECTURES,
    DraftVocabHead,
    RopeOffsetKVCache,
    VLMDecoder,
    convert_language_model,
    pair_components,
)
from ..vlm.targets import generation_defaults


class LMTarget(nn.Module):
    """A converted causal LM satisfying :class:`mmspec.types.Target` (text prompts, 1-D RoPE).

    Args:
        decoder: the converted language model.
        eos_token_ids: every id that ends a reply (HF ``generation_config.eos_token_id``).
        generation_defaults: logits processors the checkpoint asks for (``repetition_penalty``, ...).
        draft_vocab: ``[V']`` target ids the LM head scores (:class:`~mmspec.pipelines.vlm.decoder.DraftVocabHead`);
            other ids get logit ``-inf``. None: the whole vocabulary. Only for draft models.
        config: the HF model config (read by drafters sized from the target, e.g. EAGLE-3 heads).
    """

    def __init__(
        self,
        decoder: VLMDecoder,
        eos_token_ids: tuple[int, ...] = (),
        generation_defaults: Mapping[str, float] | None = None,
        draft_vocab: torch.Tensor | None = None,
        config: Any = None,
    ) -> None:
        super().__init__()
        self.decoder = decoder
        self.config = config
        self.eos_token_ids = tuple(eos_token_ids)
        self.generation_defaults = dict(generation_defaults or {})
        self.draft_head = None if draft_vocab is None else DraftVocabHead(decoder.output, draft_vocab)

    @classmethod
    def from_hf(cls, model: nn.Module) -> LMTarget:
        """Wrap an HF ``*ForCausalLM`` (left intact; unchanged weights are shared)."""
        lm_head = model.get_output_embeddings()
        if lm_head is None or not hasattr(model, "model"):
            raise ValueError(f"{type(model).__name__} is not a causal LM with an LM head (*ForCausalLM)")
        decoder = convert_language_model(model.model, lm_head, model.config)
        eos = model.generation_config.eos_token_id
        eos_ids = () if eos is None else tuple([eos] if isinstance(eos, int) else eos)
        return cls(decoder, eos_ids, generation_defaults(model.generation_config), config=model.config)

    def truncated(self, num_layers: int, draft_vocab_size: int = 0) -> LMTarget:
        """A draft model: this LM cut to its first ``num_layers`` blocks (weights shared, not copied),
        optionally scoring only ids ``0 .. draft_vocab_size - 1`` (0: all). BPE tokenizers number their
        merges in the order they were learned, most frequent first, so low ids are the common tokens."""
        config = self.decoder.config
        if not 1 <= num_layers <= config.n_layer:
            raise ValueError(f"a draft model needs 1 <= layers <= {config.n_layer} (the target's), got {num_layers}")
        if not 0 <= draft_vocab_size <= config.vocab_size:
            raise ValueError(f"draft vocabulary size must be in [0, {config.vocab_size}], got {draft_vocab_size}")
        small = replace(config, n_layer=num_layers)
        with torch.device("meta"):
            decoder = VLMDecoder(small, torch.zeros(small.head_dim // 2))
        state = {k: v for k, v in self.decoder.state_dict(keep_vars=True).items() if not _beyond(k, num_layers)}
        decoder.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True, assign=True)
        if config.tie_word_embeddings:
            decoder.output.weight = decoder.tok_embeddings.weight
        decoder.pair_component = pair_components(small).to(self.device)
        ids = torch.arange(draft_vocab_size) if draft_vocab_size else None
        return LMTarget(decoder.eval(), self.eos_token_ids, self.generation_defaults, ids, self.config)

    # ------------------------------------------------------------------ target contract
    @property
    def vocab_size(self) -> int:
        return self.decoder.vocab_size

    @property
    def device(self) -> torch.device:
        return self.decoder.output.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.output.weight.dtype

    def new_cache(self, batch_size: int, max_seq_len: int, cfg: bool = False) -> RopeOffsetKVCache:
        return self.decoder.new_cache(batch_size, max_seq_len, cfg)

    def prefill(self, prompt: TokenPrompt, cache: RopeOffsetKVCache) -> PrefillOutput:
        """Write and commit a right-padded prompt batch; the LM head runs on each row's last token only
        (:meth:`VLMDecoder.commit_prompt`)."""
        tokens = prompt.tokens
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        features = self.decoder.features(self.decoder.tok_embeddings(tokens), positions, cache)  # [B, P, H]
        last = self.decoder.commit_prompt(features, prompt.lengths, cache)  # [B, 1, H]
        return PrefillOutput(TargetOutput(logits=self._logits(last), hidden_states=last), hidden_states_all=features)

    def forward(
        self,
        tokens: torch.Tensor,  # [B, T]
        positions: torch.Tensor,  # [B, T] sequence positions (tree nodes share their depth's position)
        cache: RopeOffsetKVCache,
        attn_mask: torch.Tensor | None = None,  # [B, 1, T, S] or None (causal)
    ) -> TargetOutput:
        """Run ``tokens`` at the next ``T`` cache slots (written, not committed): logits ``[B, T, V]``."""
        h = self.decoder.features(self.decoder.tok_embeddings(tokens), positions, cache, attn_mask)
        return TargetOutput(logits=self._logits(h), hidden_states=h)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, T, V] float32
        return self.decoder.output(h).float() if self.draft_head is None else self.draft_head(h)


def _beyond(key: str, num_layers: int) -> bool:
    """Whether state-dict ``key`` belongs to a block at index >= ``num_layers``."""
    parts = key.split(".")
    return parts[0] == "layers" and int(parts[1]) >= num_layers


def load_lm(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> tuple[nn.Module, LMTarget]:
    """Load a local transformers causal-LM folder (``save_pretrained`` layout): the HF model (kept for
    peers such as ``generate``) and its :class:`LMTarget` (sharing unchanged weights).

    Raises:
        ValueError: not a supported architecture (:data:`~..vlm.decoder.TEXT_ARCHITECTURES`), the
            weights do not match the config, or a weights file is not a valid safetensors file.
    """
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in TEXT_ARCHITECTURES or getattr(config, "text_config", None) is not None:
        raise ValueError(
            f"{path} holds a {config.model_type!r} model; a causal LM of one of these types is needed: "
            f"{', '.join(sorted(t for t in TEXT_ARCHITECTURES if not t.endswith('_text')))}"
        )
    if os.path.isdir(path):  # transformers' SafetensorError would not say which file
        check_safetensors_files(path)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:  # transformers only warns, then runs with random weights
        raise ValueError(f"the weights in {path} do not match its config: {bad}")
    model = model.eval()
    if device is not None:
        model.to(device)
    return model, LMTarget.from_hf(model)
