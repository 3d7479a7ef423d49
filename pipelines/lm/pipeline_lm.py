"""``LMPipeline``: text -> text with a local transformers causal LM (Llama, Mistral, Qwen2, ...), with or
without speculative decoding, through mmspec's one draft/verify loop.

A plain class like :class:`~..vlm.VLMPipeline`: the model and tokenizer are transformers objects. The
speculative methods live in :data:`LM_METHODS` (the CLI's bench suite ``lm`` runs them): n-gram prompt
lookup, a draft model cut from the target (first layers, optionally a reduced draft vocabulary), the
pipeline's own draft model component, EAGLE-3 heads (mmspec's layout or the vLLM / SGLang format), and
the target drafting for itself (the acceptance upper bound).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoTokenizer

from mmspec.acceptance import AcceptanceRule
from mmspec.drafters import ModelDrafter, NGramDrafter
from mmspec.drafters.factory import WINDOWS, window_memory, with_window
from mmspec.loops import required_cache_len, speculative_generate
from mmspec.methods import MethodRegistry
from mmspec.sampling import SamplingConfig
from mmspec.stats import SpecStats
from mmspec.types import Drafter, TokenPrompt

from ..base import SpeculativePipelineMixin
from ..vlm.eagle3 import load_eagle3_drafter
from .target import LMTarget, load_lm


@dataclass
class LMPipelineOutput:
    """``text``: one reply per prompt (special tokens skipped); ``token_ids``: ``[B, N]`` generated ids,
    ``pad_token_id`` after each row's end; ``lengths``: ``[B]`` tokens per reply (up to and including its
    end-of-sequence token); ``stats``: :class:`~mmspec.stats.SpecStats`."""

    text: list[str]
    token_ids: torch.Tensor
    lengths: torch.Tensor
    stats: SpecStats


#: The LM pipeline's speculative methods (``speculative=`` names).
LM_METHODS = MethodRegistry("LMPipeline")


def _check_window(options: dict) -> None:
    if options["window"] not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, got {options['window']!r}")


@LM_METHODS.register("ngram", options={"max_ngram": 3, "min_ngram": 2, "batch_width": "min", "window": "fixed"})
def _ngram(pipe: LMPipeline, options: dict) -> Drafter:
    """Prompt lookup: the continuation of the longest n-gram (``min_ngram`` to ``max_ngram`` tokens) of the
    prompt and reply matching the last tokens, only as far as it matched (training-free; ``batch_width`` "min"/"max": the width of a batch
    whose rows matched different lengths; ``window``: "fixed" or an adaptive cap, "heuristic"/"cost")."""
    _check_window(options)
    drafter = NGramDrafter(pipe.target.vocab_size, options["max_ngram"], options["min_ngram"], options["batch_width"])
    return with_window(drafter, options["window"], window_memory(pipe._window_memo, "ngram", options))


@LM_METHODS.register("draft-model", options={"layers": 2, "draft_vocab": 0, "window": "fixed"})
def _draft_model(pipe: LMPipeline, options: dict) -> Drafter:
    """A draft model cut from the target: its first ``layers`` blocks (weights shared), scoring only the
    first ``draft_vocab`` token ids (0: the whole vocabulary; proposals stay target ids, lossless)."""
    _check_window(options)
    model = pipe.target.truncated(options["layers"], options["draft_vocab"])
    memory = window_memory(pipe._window_memo, "draft-model", options)
    return with_window(ModelDrafter(model), options["window"], memory)


@LM_METHODS.register("model", requires=("draft_model",), options={"alternatives": 1})
def _model(pipe: LMPipeline, options: dict) -> Drafter:
    """The pipeline's ``draft_model`` component (any LM with the target's vocabulary; ``alternatives`` > 1:
    that many sibling tokens per depth, a tree)."""
    if pipe.draft_model is None:
        raise ValueError("speculative='model' needs the pipeline's draft model (LMPipeline(..., draft_model=...))")
    return ModelDrafter(pipe.draft_model, num_alternatives=options["alternatives"])


@LM_METHODS.register("eagle3", options={"path": None, "layer_convention": None}, needs_options=("path",))
def _eagle3(pipe: LMPipeline, options: dict) -> Drafter:
    """EAGLE-3 (arXiv 2503.01840): a head over three fused target layers with a reduced draft vocabulary,
    from ``path`` -- mmspec's saved layout or the vLLM / SGLang format (``layer_convention``: how that
    file's aux layer ids read, default "sglang")."""
    if options.get("path") is None:
        raise ValueError("speculative='eagle3' needs speculative_options={'path': DIR}")
    return load_eagle3_drafter(options["path"], pipe.target, layer_convention=options.get("layer_convention"))


@LM_METHODS.register("self-draft")
def _self_draft(pipe: LMPipeline, options: dict) -> Drafter:
    """The target drafts for itself: every draft is accepted (the acceptance upper bound; never faster)."""
    return ModelDrafter(pipe.target)


class LMPipeline(SpeculativePipelineMixin):
    """Speculative decoding for a causal language model.

    Args:
        target: the model (:class:`~.target.LMTarget`, e.g. from :func:`~.target.load_lm`).
        tokenizer: its HF tokenizer (chat template, decoding); None: prompts must be
            :class:`~mmspec.types.TokenPrompt` and ``text`` is empty (token ids only).
        draft_model: an optional draft model component (an mmspec target with the same vocabulary, e.g.
            ``target.truncated(2)`` or another converted LM), for ``speculative="model"``.
    """

    methods = LM_METHODS

    def __init__(self, target: LMTarget, tokenizer: Any, draft_model: Any = None) -> None:
        self.target = target
        self.tokenizer = tokenizer
        self.draft_model = draft_model
        self._window_memo: dict = {}  # adaptive windows' learned widths, per method and options

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> LMPipeline:
        """Load a local transformers causal-LM folder and its tokenizer."""
        _, target = load_lm(path, dtype=dtype, device=device)
        return cls(target, AutoTokenizer.from_pretrained(path))

    def build_prompt(self, prompt: str | Sequence[str], chat: bool = True) -> TokenPrompt:
        """Tokenise one prompt or a list (right-padded); ``chat``: wrap each in the tokenizer's chat
        template as one user turn (when it has one)."""
        if self.tokenizer is None:
            raise ValueError("this pipeline has no tokenizer: pass a TokenPrompt")
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if chat and self.tokenizer.chat_template is not None:
            ids = [
                self.tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
                for t in texts
            ]
            ids = [list(i["input_ids"]) if isinstance(i, dict) or hasattr(i, "keys") else list(i) for i in ids]
        else:
            ids = [self.tokenizer(t)["input_ids"] for t in texts]
        return TokenPrompt.from_lists(ids, pad_id=self._pad_token_id(), device=self.target.device)

    @torch.no_grad()  # the loop itself runs in inference mode and returns normal tensors
    def __call__(
        self,
        prompt: str | Sequence[str] | TokenPrompt,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        speculative: str | None = None,
        speculative_options: dict | None = None,
        num_draft_tokens: int = 4,
        acceptance: str | AcceptanceRule | None = None,
        chat: bool = True,
        profile: bool = False,
        return_dict: bool = True,
    ) -> LMPipelineOutput | tuple:
        """Continue ``prompt`` (a string, a list, or a pre-tokenised :class:`~mmspec.types.TokenPrompt`).

        Args:
            max_new_tokens: reply length limit; a reply also ends at any of the model's EOS ids.
            temperature, top_k, top_p: sampling (``temperature=0``: greedy).
            generator: seeds every random draw.
            speculative: a method of :data:`LM_METHODS` (None: the autoregressive baseline).
            speculative_options: the method's options. ``num_draft_tokens``: drafts per step (the cap).
            acceptance: the acceptance rule (None: the method's own, ``"exact"``).
            chat: apply the chat template to string prompts.
            profile: time draft and verify separately (``stats.draft_time`` / ``verify_time``).
            return_dict: False returns ``(text, token_ids, lengths, stats)``.
        """
        if max_new_tokens < 1 or num_draft_tokens < 1:
            raise ValueError(
                f"need max_new_tokens >= 1 and num_draft_tokens >= 1, got {max_new_tokens}, {num_draft_tokens}"
            )
        token_prompt = prompt if isinstance(prompt, TokenPrompt) else self.build_prompt(prompt, chat)
        spec = self.resolve_speculation(speculative, speculative_options, acceptance)
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
        window = 1 if spec.drafter is None else spec.drafter.verify_width(num_draft_tokens)
        capacity = required_cache_len(token_prompt.tokens.shape[1], max_new_tokens, window)
        eos_ids = self.target.eos_token_ids
        pad_id = self._pad_token_id()
        # Drafters that read other target features than the last layer's (EAGLE-3: three layers fused)
        # say so by wrapping the target for this run.
        features_target = getattr(spec.drafter, "features_target", None)
        out = speculative_generate(
            self.target if features_target is None else features_target(self.target),
            token_prompt,
            self.target.new_cache(token_prompt.tokens.shape[0], capacity),
            max_new_tokens=max_new_tokens,
            drafter=spec.drafter,
            acceptance=spec.rule,
            num_draft_tokens=num_draft_tokens,
            sampling=sampling,
            generator=generator,
            eos_token_id=eos_ids[0] if eos_ids else None,
            pad_token_id=pad_id,
            profile=profile,
        )
        tokens, lengths = out.tokens, out.lengths
        if len(eos_ids) > 1:  # the loop stops at the first id; the others end a reply too
            steps = torch.arange(tokens.shape[1], device=tokens.device)[None]
            is_eos = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device)) & (steps < lengths[:, None])
            lengths = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, lengths)
            tokens = tokens.masked_fill(steps >= lengths[:, None], pad_id)
            out.stats.trim(lengths)
        rows = [row[:n] for row, n in zip(tokens.tolist(), lengths.tolist())]
        text = (
            [""] * len(rows) if self.tokenizer is None else self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        )
        result = LMPipelineOutput(text=text, token_ids=tokens, lengths=lengths, stats=out.stats)
        return result if return_dict else (result.text, result.token_ids, result.lengths, result.stats)

    def _pad_token_id(self) -> int:
        pad = None if self.tokenizer is None else self.tokenizer.pad_token_id
        return int(pad) if pad is not None else (self.target.eos_token_ids or (0,))[0]
