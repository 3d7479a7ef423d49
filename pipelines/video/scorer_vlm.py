"""VQAScore-style frame scorer on any mmspec VLM (:class:`~mmspec.pipelines.vlm.VLMPipeline`).

VQAScore (Lin et al. 2024, "Evaluating Text-to-Visual Generation with Image-to-Text Generation",
arXiv 2404.01291) scores an image against a text by the probability a VLM answers "Yes" to
"Does this figure show {text}?". Small captioners answer no yes/no questions, so this scorer asks the
VLM's own question (default "What is in the image?") and scores the prompt as the *answer*: the
log-probability of the prompt's tokens (and the end-of-answer token) given the frame, divided by the
number of those tokens -- the likelihood-of-caption variant of the same idea (VisualGPTScore, Lin et
al. 2023, arXiv 2306.01879). One teacher-forced forward per batch of frames, no generation.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .scorer_base import FrameScorer, register_frame_scorer


@register_frame_scorer
class VLMCaptionScorer(FrameScorer):
    """Mean log-probability per answer token that a VLM gives the prompt as its reply to
    ``question`` about each frame.

    Args:
        pipeline: a :class:`~mmspec.pipelines.vlm.VLMPipeline` (its target and processor are used;
            its drafter is not).
        question: the user turn put before the frame's answer (the embedded emoji captioner was
            trained on "What is in the image?").
        batch_size: frames per forward.
    """

    name = "vlm"
    measures = (
        "mean log-probability per token (nats, <= 0) that the VLM gives the prompt as its answer to the "
        "question about the frame, end-of-answer token included; 0 = certain"
    )

    def __init__(self, pipeline: Any, question: str = "What is in the image?", batch_size: int = 64) -> None:
        super().__init__(batch_size)
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"question must be a non-empty string, got {question!r}")
        self.pipeline = pipeline
        self.target = pipeline.target  # registered, so .to() moves the VLM
        self.question = question
        self._answers: dict[str, list[int]] = {}

    @classmethod
    def from_options(
        cls,
        pipeline: Any = None,
        path: str | os.PathLike | None = None,
        question: str = "What is in the image?",
        batch_size: int = 64,
        device: str | torch.device | None = None,
    ) -> VLMCaptionScorer:
        """From a loaded ``pipeline`` or a VLM folder ``path`` (transformers ``save_pretrained``
        format, loaded in float32 on ``device``; the embedded captioner is at
        ``mmspec.app.defaults.default_captioner_path()``).

        Raises:
            ValueError: neither or both of ``pipeline`` and ``path``.
            FileNotFoundError: ``path`` holds no model (the message names it).
        """
        if (pipeline is None) == (path is None):
            raise ValueError(
                "the 'vlm' scorer needs exactly one of pipeline= (a VLMPipeline) or path= (a VLM folder, e.g. "
                "the embedded captioner: mmspec.app.defaults.default_captioner_path())"
            )
        if path is not None:
            from ..vlm import VLMPipeline

            if not (Path(path) / "config.json").is_file():
                raise FileNotFoundError(f"no VLM for the 'vlm' scorer in {os.fspath(path)!r} (config.json is missing)")
            pipeline = VLMPipeline.from_pretrained(path, dtype=torch.float32, device=device)
        return cls(pipeline, question=question, batch_size=batch_size)

    def answer_ids(self, caption: str) -> list[int]:
        """Token ids of ``caption`` as the assistant's reply in the chat template, up to and
        including the first end-of-sequence token: the text of the user turn followed by the
        answer, minus the generation prompt's tokens.

        Raises:
            ValueError: the template's tokens of the prompt are not a prefix of those of prompt +
                answer (a template this scorer cannot split), or the answer has no tokens.
        """
        if caption not in self._answers:
            processor, tokenizer = self.pipeline.processor, self.pipeline.processor.tokenizer
            user = [{"role": "user", "content": [{"type": "text", "text": self.question}]}]
            reply = [{"role": "assistant", "content": [{"type": "text", "text": caption}]}]
            prefix = processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
            full = processor.apply_chat_template(user + reply, tokenize=False)
            prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
            full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            if full_ids[: len(prefix_ids)] != prefix_ids:
                raise ValueError(
                    "the VLM's chat template does not tokenize the generation prompt as a prefix of prompt + "
                    f"answer ({prefix!r} vs {full!r}): the 'vlm' scorer cannot locate the answer tokens"
                )
            ids = full_ids[len(prefix_ids) :]
            ends = [i for i, t in enumerate(ids) if t in self.target.eos_token_ids]
            ids = ids[: ends[0] + 1] if ends else ids
            if not ids:
                raise ValueError(f"the caption {caption!r} gives no answer tokens")
            self._answers[caption] = ids
        return self._answers[caption]

    def score_images(
        self,
        captions: list[str],
        images: torch.Tensor,  # [N, 3, H, W] float in [0, 1]
    ) -> torch.Tensor:
        """Mean log-probability per answer token ``[N]`` of ``captions[i]`` given ``images[i]``."""
        # 1. the question with each frame, through the VLM's own processor (right-padded)
        prompt = self.pipeline.build_prompt(
            list(images.detach().float().clamp(0, 1).cpu()), [self.question] * len(captions)
        )
        answers = [self.answer_ids(caption) for caption in captions]
        # 2. append each row's answer after its prompt (teacher forcing)
        n, p = prompt.tokens.shape
        total = int(prompt.lengths.max()) + max(len(a) for a in answers)
        # slots past a row's length hold 0: never attended by the row's tokens (causal) nor embedded as images
        tokens = torch.zeros((n, max(total, p)), dtype=torch.long)
        tokens[:, :p] = prompt.tokens
        answer_mask = torch.zeros_like(tokens, dtype=torch.bool)  # [N, T] True at answer tokens
        for i, ids in enumerate(answers):
            start = int(prompt.lengths[i])
            tokens[i, start : start + len(ids)] = torch.tensor(ids)
            answer_mask[i, start : start + len(ids)] = True
        lengths = prompt.lengths + torch.tensor([len(a) for a in answers])
        types = prompt.mm_token_type_ids
        if types is not None:  # answer tokens are text (0)
            types = torch.cat([types, types.new_zeros(n, tokens.shape[1] - p)], dim=1)
        full = replace(prompt, tokens=tokens, lengths=lengths, mm_token_type_ids=types).to(self.target.device)
        # 3. one forward over prompt + answer; logits at t-1 predict the token at t
        target = self.target
        embeds = target.embed_prompt(full)  # [N, T, H]
        positions, offsets = target.rope_positions(full)
        cache = target.new_cache(n, tokens.shape[1])
        cache.rope_offsets.copy_(offsets)
        logits = target.decoder.forward_embeds(embeds, positions, cache).logits  # [N, T, V]
        logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)  # [N, T-1, V]
        tokens, answer_mask = tokens.to(logits.device), answer_mask.to(logits.device)
        picked = logprobs.gather(-1, tokens[:, 1:, None])[..., 0]  # [N, T-1]
        mask = answer_mask[:, 1:]
        return (picked * mask).sum(1) / mask.sum(1)
