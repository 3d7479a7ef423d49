"""``VLMPipeline``: image(s) + question -> text with a transformers VLM, with or without speculative
decoding, through mmspec's one draft/verify loop.

A plain class rather than a ``diffusers.DiffusionPipeline``: VLMs, their processors and chat
templates are transformers objects. ``num_draft_tokens=0`` (or no drafter) runs the plain
autoregressive baseline through the same target, cache and sampling code, for A/B comparisons.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers import AutoProcessor

from mmspec.acceptance import AcceptanceRule
from mmspec.drafters import NGramDrafter
from mmspec.drafters.eagle3 import Eagle3Drafter
from mmspec.loops import required_cache_len, speculative_generate
from mmspec.methods import MethodRegistry
from mmspec.sampling import SamplingConfig
from mmspec.stats import SpecStats
from mmspec.types import DraftContext, Drafter

from ..base import SpeculativePipelineMixin
from ..validation import array_to_pil, check_vlm_call, is_single_image
from .eagle3 import load_eagle3_drafter
from .targets import VLMPrompt, VLMTarget, load_vlm_target

#: One image: PIL, a path, or an array / tensor (``[H, W, C]`` or ``[C, H, W]``, uint8 or floats in [0, 1]).
ImageInput = PIL.Image.Image | str | os.PathLike | Any


@dataclass
class VLMPipelineOutput:
    """``text``: one reply per prompt (special tokens skipped); ``token_ids``: ``[B, N]`` generated ids,
    ``pad_token_id`` after each row's end; ``lengths``: ``[B]`` tokens per reply (up to and including
    its end-of-sequence token); ``stats``: :class:`~mmspec.stats.SpecStats` (``token_source`` says
    which tokens were drafted-and-accepted, recovered or bonus)."""

    text: list[str]
    token_ids: torch.Tensor
    lengths: torch.Tensor
    stats: SpecStats


#: The VLM pipeline's speculative methods (``speculative=`` names); the CLI and demos list them.
VLM_METHODS = MethodRegistry("VLMPipeline")


@VLM_METHODS.register("model", requires=("drafter",))
def _model(pipe: VLMPipeline, options: dict) -> Drafter:
    """The pipeline's drafter component (a draft VLM/LM or a vision-aware EAGLE head)."""
    if pipe.drafter is None:
        raise ValueError("speculative='model' needs the pipeline's drafter (VLMPipeline(..., drafter=...))")
    return pipe.drafter


@VLM_METHODS.register("ngram")
def _ngram(pipe: VLMPipeline, options: dict) -> NGramDrafter:
    """Prompt lookup: n-grams of the prompt and reply propose the continuation (training-free)."""
    return NGramDrafter(pipe.target.vocab_size)


@VLM_METHODS.register("eagle3", options={"path": None, "layer_convention": None}, needs_options=("path",))
def _eagle3(pipe: VLMPipeline, options: dict) -> Drafter:
    """EAGLE-3 (arXiv 2503.01840): a head over three fused target layers with a reduced draft
    vocabulary, from ``path`` -- mmspec's saved layout (``mmspec train-drafter --arch eagle3``) or the
    vLLM / SGLang format (``layer_convention``: how that file's aux layer ids read, default "sglang")."""
    if options.get("path") is None:
        if isinstance(pipe.drafter, Eagle3Drafter):
            return pipe.drafter
        raise ValueError(
            "speculative='eagle3' needs speculative_options={'path': DIR} (or an Eagle3Drafter as drafter)"
        )
    return load_eagle3_drafter(options["path"], pipe.target, layer_convention=options.get("layer_convention"))


class VLMPipeline(SpeculativePipelineMixin):
    """Speculative decoding for a VLM.

    Args:
        target: the model (:func:`~.targets.load_vlm_target`).
        processor: the model's HF processor (chat template, image preprocessing, tokenizer).
        drafter: the default drafter (an mmspec :class:`~mmspec.types.Drafter` with the target's
            vocabulary), used when a call passes none; None = the baseline by default.
    """

    methods = VLM_METHODS

    def __init__(self, target: VLMTarget, processor: Any, drafter: Drafter | None = None) -> None:
        self.target = target
        self.processor = processor
        self.drafter = drafter

    def _packable(self) -> torch.nn.Module:
        """The language model only: the vision encoder runs once per image, and until released
        (:meth:`VLMTarget.from_hf`) it holds the transformers language model, which callers may
        still run themselves (the bench's peers do) and must get unchanged."""
        return self.target.decoder

    def rule_resources(self) -> dict:
        """Rules over text tokens get the language model's token embedding (GSD's ``embedding="tokens"``)."""
        return {"token_embeddings": self.target.decoder.tok_embeddings.weight.detach().float()}

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        drafter: Drafter | None = None,
    ) -> VLMPipeline:
        """Load target and processor from an HF checkpoint directory or hub id."""
        return cls(load_vlm_target(path, dtype=dtype, device=device), AutoProcessor.from_pretrained(path), drafter)

    # ------------------------------------------------------------------ inputs
    def build_prompt(self, images: ImageInput | Sequence[Any] | None, prompt: str | Sequence[str]) -> VLMPrompt:
        """Apply the chat template (one user turn: the images, then the text) and the processor.

        Args:
            images: for one prompt: None, an image (PIL or path) or a list of images; for a list of
                prompts: None or one such entry per prompt.
            prompt: a question or a list of questions (a batch).

        Raises:
            ValueError: an image cannot be read (the message names it), or images do not match prompts.
        """
        if not isinstance(prompt, str) and (
            not isinstance(prompt, Sequence) or not all(isinstance(p, str) for p in prompt)
        ):
            raise ValueError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt is an empty list: pass at least one question")
        if not isinstance(prompt, str) and is_single_image(images):
            raise ValueError(
                f"got {len(prompts)} prompts but a single image: pass one entry per prompt, e.g. "
                f"[image] * {len(prompts)} for the same image"
            )
        per_prompt = [images] if isinstance(prompt, str) else images
        if per_prompt is None:
            per_prompt = [None] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(
                f"got {len(prompts)} prompts but {len(per_prompt)} image entries: give one entry per prompt"
            )
        texts, flat = [], []
        for question, entry in zip(prompts, per_prompt):
            if entry is None:
                row = []
            elif is_single_image(entry):
                row = [entry]
            else:
                row = list(entry)
            flat += [_load_image(image, len(flat) + i) for i, image in enumerate(row)]
            content = [{"type": "image"} for _ in row] + [{"type": "text", "text": question}]
            messages = [{"role": "user", "content": content}]
            texts.append(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        batch = self.processor(images=flat or None, text=texts, return_tensors="pt", padding=True)
        return VLMPrompt.from_processor(batch)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def __call__(
        self,
        images: ImageInput | Sequence[Any] | None,
        prompt: str | Sequence[str] | VLMPrompt,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        drafter: Drafter | None = None,
        num_draft_tokens: int = 4,
        acceptance: str | AcceptanceRule = "exact",
        return_dict: bool = True,
        stream: bool = False,
        speculative: str | None = None,
        callback_on_step_end: Callable[[VLMPipeline, int, None, dict], Any] | None = None,
        repetition_penalty: float | None = None,
        speculative_options: dict | None = None,
        profile: bool = False,
    ) -> VLMPipelineOutput | tuple | Iterator[str]:
        """Answer ``prompt`` about ``images``.

        Args:
            images, prompt: see :meth:`build_prompt`; ``prompt`` may instead be a pre-processed
                :class:`~.targets.VLMPrompt` (then ``images`` must be None).
            max_new_tokens: reply length limit; a reply also ends at any of the model's EOS ids.
            temperature, top_k, top_p: sampling (``temperature=0``: greedy).
            generator: seeds every random draw.
            drafter: overrides the pipeline's drafter for this call.
            num_draft_tokens: drafts per step (0: the autoregressive baseline, even with a drafter).
            speculative: a method of :data:`VLM_METHODS` (``"model"``: the pipeline's drafter,
                ``"ngram"``: prompt lookup, ``"eagle3"``) instead of a drafter object; not both.
            speculative_options: the method's options (e.g. ``{"path": DIR}`` for ``"eagle3"``).
            acceptance: the acceptance rule (name or instance), e.g. ``"exact"``, ``"greedy"``.
            repetition_penalty: CTRL's penalty as transformers applies it (prompt tokens included),
                in target and drafts alike; None = the checkpoint's ``generation_config`` value
                (``target.generation_defaults``; Qwen2-VL-Instruct ships 1.05), 1 = off.
            return_dict: False returns ``(text, token_ids, lengths, stats)``.
            stream: return a generator of text pieces (one per verify step, for a single prompt);
                its return value (``StopIteration.value``) is the full output.
            profile: time draft, verify and acceptance separately (``stats.draft_time`` / ``verify_time`` /
                ``accept_time``; device syncs, for benchmarks).
            callback_on_step_end: ``f(pipe, step, None, {"num_generated": [B], "token_ids": [B, S]})``
                after every verify step (diffusers convention; ``token_ids``: prompt + reply so far,
                valid up to each row's prompt length + ``num_generated``); not with ``stream``.
        """
        check_vlm_call(self, max_new_tokens=max_new_tokens, num_draft_tokens=num_draft_tokens)
        if isinstance(prompt, VLMPrompt):
            if images is not None:
                raise ValueError("pass images=None with a pre-processed VLMPrompt (its pixel values are inside)")
            vlm_prompt = prompt
        else:
            vlm_prompt = self.build_prompt(images, prompt)
        vlm_prompt = vlm_prompt.to(self.target.device, self.target.dtype)
        check_vlm_call(
            self,
            max_new_tokens=max_new_tokens,
            num_draft_tokens=num_draft_tokens,
            prompt_length=vlm_prompt.tokens.shape[1],
        )
        if speculative is not None and drafter is not None:
            raise ValueError("pass either speculative= (a method name) or drafter= (an object), not both")
        spec = self.resolve_speculation(speculative, speculative_options, acceptance)
        acceptance = spec.rule
        drafter = spec.drafter if spec.drafter is not None else drafter if drafter is not None else self.drafter
        drafter = drafter if num_draft_tokens > 0 else None
        if repetition_penalty is None:
            repetition_penalty = self.target.generation_defaults.get("repetition_penalty", 1.0)
        sampling = SamplingConfig(
            temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty
        )
        settings = dict(
            max_new_tokens=max_new_tokens,
            drafter=drafter,
            acceptance=acceptance,
            sampling=sampling,
            num_draft_tokens=num_draft_tokens if drafter is not None else 0,
            generator=generator,
            profile=profile,
        )
        if stream:
            if vlm_prompt.tokens.shape[0] != 1:
                raise ValueError("stream=True needs a single prompt")
            if callback_on_step_end is not None:
                raise ValueError("stream=True reports every step itself: pass no callback_on_step_end")
            return self._stream(vlm_prompt, settings, return_dict)
        callback = None
        if callback_on_step_end is not None:

            def callback(step: int, num_generated: torch.Tensor, ctx: DraftContext) -> None:
                callback_on_step_end(self, step, None, {"num_generated": num_generated, "token_ids": ctx.history})

        return self._pack(self._generate(vlm_prompt, settings, callback), return_dict)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> VLMPipeline:
        """Move the target and the drafter (when it is a module) to ``device`` / ``dtype``, like
        ``DiffusionPipeline.to``; returns the pipeline."""
        for model in (self.target, self.drafter):
            if isinstance(model, torch.nn.Module):
                model.to(device=device, dtype=dtype)
        return self

    def _generate(
        self,
        prompt: VLMPrompt,
        settings: dict,
        callback: Callable[[int, torch.Tensor, DraftContext], None] | None = None,
    ) -> VLMPipelineOutput:
        """One loop run. A reply ends at the first of the model's EOS ids: the loop stops at the first
        id, the rest are cut here."""
        drafter = settings["drafter"]
        window = (
            1 if drafter is None else drafter.verify_width(settings["num_draft_tokens"])
        )  # tokens per verify forward
        capacity = required_cache_len(prompt.tokens.shape[1], settings["max_new_tokens"], window)
        # The vision tower runs once even when a model drafter prefills the same prompt.
        prompt = self.target.encode_images(prompt)
        eos_ids = self.target.eos_token_ids
        pad_id = self._pad_token_id()
        # Drafters that read other target features than the last layer's (EAGLE-3: three layers
        # fused) say so by wrapping the target for this run.
        features_target = getattr(drafter, "features_target", None)
        target = self.target if features_target is None else features_target(self.target)
        out = speculative_generate(
            target,
            prompt,
            self.target.new_cache(prompt.tokens.shape[0], capacity),
            eos_token_id=eos_ids[0] if eos_ids else None,
            pad_token_id=pad_id,
            callback=callback,
            **settings,
        )
        tokens, lengths = out.tokens, out.lengths
        if len(eos_ids) > 1:
            steps = torch.arange(tokens.shape[1], device=tokens.device)[None]
            is_eos = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device)) & (steps < lengths[:, None])
            lengths = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, lengths)
            cut = steps >= lengths[:, None]
            tokens = tokens.masked_fill(cut, pad_id)
            out.stats.trim(lengths)  # as the loop does at its own end
        rows = [row[:n] for row, n in zip(tokens.tolist(), lengths.tolist())]
        return VLMPipelineOutput(text=self._decode(rows), token_ids=tokens, lengths=lengths, stats=out.stats)

    def _stream(self, prompt: VLMPrompt, settings: dict, return_dict: bool) -> Iterator[str]:
        """Run the loop in a worker thread; yield the reply's new text after every verify step (read
        from the loop's context: prompt + committed tokens). Closing the generator stops the loop at
        its next step."""
        pieces: queue.Queue = queue.Queue()
        stop = threading.Event()
        prompt_length = int(prompt.lengths[0])

        def on_step(step: int, num_generated: torch.Tensor, ctx: DraftContext) -> None:
            if stop.is_set():
                raise _Cancelled
            reply = ctx.history[0, prompt_length : int(ctx.history_lengths[0])]  # deliberate sync: streaming
            pieces.put(self._reply_prefix(reply.tolist(), settings["max_new_tokens"]))

        def work() -> None:
            try:
                with torch.no_grad():  # grad mode is per thread
                    pieces.put(self._generate(prompt, settings, callback=on_step))
            except _Cancelled:
                return
            except Exception as exc:  # handed to the consuming thread, which re-raises it
                pieces.put(exc)

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        shown = ""
        try:
            while True:
                item = pieces.get()
                if isinstance(item, Exception):
                    raise item
                final = isinstance(item, VLMPipelineOutput)
                text = item.text[0] if final else self._decode([item])[0]
                # Decoding more tokens can rewrite the tail of the text (merged pieces): emit only
                # once the earlier text is stable.
                if text.startswith(shown) and len(text) > len(shown):
                    yield text[len(shown) :]
                    shown = text
                if final:
                    return self._pack(item, return_dict)
        finally:
            stop.set()
            worker.join()

    # ------------------------------------------------------------------ helpers
    def _pad_token_id(self) -> int:
        pad = self.processor.tokenizer.pad_token_id
        return -1 if pad is None else int(pad)

    def _reply_prefix(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """The reply as the final output will hold it: at most ``max_new_tokens``, cut after an EOS."""
        ids = ids[:max_new_tokens]
        ends = [i for i, token in enumerate(ids) if token in self.target.eos_token_ids]
        return ids[: ends[0] + 1] if ends else ids

    def _decode(self, rows: list[list[int]]) -> list[str]:
        return self.processor.tokenizer.batch_decode(rows, skip_special_tokens=True)

    @staticmethod
    def _pack(out: VLMPipelineOutput, return_dict: bool) -> VLMPipelineOutput | tuple:
        return out if return_dict else (out.text, out.token_ids, out.lengths, out.stats)


def _load_image(image: ImageInput, index: int) -> PIL.Image.Image:
    """A decoded PIL image from a PIL image or a path, **unconverted** (an RGB image from a numpy
    array or tensor, in the layouts transformers' processors take); ``ValueError`` naming the image
    if it is unreadable.

    The mode is left to the processor, as ``processor(images=...)`` + ``model.generate`` do:
    transformers' image processors composite transparent pixels (RGBA, LA, P with a transparent
    colour) onto white (``image_transforms.convert_to_rgb``), while ``Image.convert("RGB")`` would
    expose the hidden colour of fully transparent pixels and change the answers (issue 16, bug 1).
    """
    if not isinstance(image, (PIL.Image.Image, str, os.PathLike, *_ARRAYS)):
        raise ValueError(
            f"image #{index} must be a PIL image, a path, a numpy array or a tensor, got {type(image).__name__}"
        )
    if isinstance(image, _ARRAYS):
        return array_to_pil(image, f"image #{index}")
    name = f"image #{index}" if isinstance(image, PIL.Image.Image) else f"{os.fspath(image)!r}"
    try:
        loaded = image if isinstance(image, PIL.Image.Image) else PIL.Image.open(image)
        loaded.load()  # decode now: truncated or corrupt files fail here, not inside the processor
        return loaded
    except OSError as exc:
        raise ValueError(f"cannot read {name}: {exc}") from exc


_ARRAYS = (torch.Tensor, np.ndarray)


class _Cancelled(Exception):
    """Raised inside the loop's callback when a stream's consumer has gone away."""
