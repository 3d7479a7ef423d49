"""The captioner's training data: emoji scenes rendered once per process, tokenised into
question/answer examples, and the teacher-forced caption loss (:mod:`mmspec.training.captioner`)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from .captioner_model import IGNORE_INDEX, TRAIN_QUESTIONS, chat_prompt
from .reference_data import EmojiDataConfig


# ---------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class CaptionDataConfig(EmojiDataConfig):
    """The emoji scenes the captioner learns from (one glyph per scene, captioned by its name): the
    reference models' :class:`~mmspec.training.reference_data.EmojiDataConfig` with more classes and
    scenes and a little more augmentation (the vision tower must tell 128 glyphs apart)."""

    num_classes: int = 128
    num_samples: int = 24576
    heldout_samples: int = 512
    position_jitter: float = 0.06
    scale_range: tuple[float, float] = (0.7, 0.95)
    rotation_degrees: float = 10.0
    backgrounds: tuple[str, ...] = ("white", "solid", "gradient")


# ---------------------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=4)
def render_caption_data(
    data: CaptionDataConfig, heldout: bool = False, progress: bool = True
) -> tuple[np.ndarray, tuple[str, ...], torch.Tensor]:
    """Render the whole training (or held-out) set once, cached for the process (``progress``: a
    bar for sets of 2,048 scenes or more).

    Returns:
        ``(images uint8 [N, H, W, 3], captions, labels int64 [N])``.
    """
    dataset = data.dataset(heldout)
    images = np.empty((len(dataset), data.image_size, data.image_size, 3), dtype=np.uint8)
    captions = []
    labels = torch.empty(len(dataset), dtype=torch.long)
    for i in tqdm(range(len(dataset)), desc="render emoji", leave=False, disable=not progress or len(dataset) < 2048):
        item = dataset[i]
        images[i] = np.asarray(item["image"])
        captions.append(item["caption"])
        labels[i] = item["label"]
    return images, tuple(captions), labels


def reply_token_budget(tokenizer, captions: Sequence[str]) -> int:
    """``max_new_tokens`` for a captioner's replies: the longest of ``captions`` as ``tokenizer``
    encodes it, plus 4 (room to see a reply run on past the reference's length)."""
    return max(len(tokenizer.encode(c, add_special_tokens=False)) for c in set(captions)) + 4


@dataclass
class CaptionBatch:
    """A right-padded training batch: ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]``
    (labels are the input ids on answer tokens, :data:`IGNORE_INDEX` elsewhere) and the images,
    either as ``pixel_values [B, 3, H, W]`` or as the vision tower's selected features
    ``image_features [B, n, vision_dim]`` (before the projector)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_features: torch.Tensor | None = None

    def to(self, device: str | torch.device) -> CaptionBatch:
        """The batch with every tensor on ``device``."""
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return CaptionBatch(**{name: None if t is None else t.to(device) for name, t in moved.items()})


class CaptionExamples:
    """Images and captions tokenised once; :meth:`batch` assembles prompt + answer sequences.

    A prompt is ``prefix + question + suffix`` token ids (the chat template split around the
    question), so that question words can be replaced by ``<unk>`` without re-tokenising; the
    constructor checks the split against the processor. After :meth:`cache_features`, batches carry
    the (frozen) vision tower's features instead of pixels.
    """

    def __init__(
        self,
        processor: LlavaProcessor,
        images: np.ndarray,
        captions: Sequence[str],
        questions: Sequence[str] = TRAIN_QUESTIONS,
    ) -> None:
        self.processor = processor
        self.images = images
        self.features: torch.Tensor | None = None
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.unk_id = tokenizer.unk_token_id
        encode = functools.partial(tokenizer.encode, add_special_tokens=False)
        self.answers = [encode(c) + [tokenizer.eos_token_id] for c in captions]
        if any(self.unk_id in a for a in self.answers):
            raise ValueError("a caption has words outside the tokenizer's vocabulary")
        self.questions = [encode(q) for q in questions]
        marker = "\x00"
        before, after = chat_prompt(processor, marker).split(marker)
        self.prefix = self.prompt_ids(before)
        self.suffix = encode(after)
        for question, ids in zip(questions, self.questions):
            if self.prompt_ids(chat_prompt(processor, question)) != self.prefix + ids + self.suffix:
                raise ValueError(f"the chat template does not tokenise as prefix + question + suffix for {question!r}")

    def __len__(self) -> int:
        return len(self.answers)

    def prompt_ids(self, text: str) -> list[int]:
        """Token ids of prompt ``text`` holding one ``<image>``, expanded as the processor does."""
        batch = self.processor(images=[self.images[0]], text=[text], return_tensors="pt")
        return batch["input_ids"][0].tolist()

    def pixel_values(self, rows: Sequence[int]) -> torch.Tensor:
        """The processor's pixel values of images ``rows`` (``[len(rows), 3, H, W]``)."""
        return self.processor.image_processor(images=[self.images[r] for r in rows], return_tensors="pt")[
            "pixel_values"
        ]

    @torch.no_grad()
    def cache_features(self, model: LlavaForConditionalGeneration, batch_size: int = 256) -> None:
        """Compute every image's vision features once with ``model``'s (frozen) vision tower."""
        self.features = torch.cat(
            [vision_features(model, self.pixel_values(rows)) for rows in _chunks(len(self), batch_size)]
        )

    def batch(
        self,
        rows: Sequence[int],
        questions: Sequence[int],
        generator: torch.Generator | None = None,
        unk_prob: float = 0.0,
    ) -> CaptionBatch:
        """Examples ``rows`` asked question ``questions[i]`` (an index into the constructor's
        ``questions``); each question word becomes ``<unk>`` with probability ``unk_prob`` (draws
        from ``generator``)."""
        sequences, prompt_lengths = [], []
        for row, q in zip(rows, questions):
            question = torch.tensor(self.questions[q], dtype=torch.long)
            if unk_prob > 0:
                question = question.masked_fill(torch.rand(question.shape, generator=generator) < unk_prob, self.unk_id)
            sequences.append(self.prefix + question.tolist() + self.suffix + self.answers[row])
            prompt_lengths.append(len(self.prefix) + len(question) + len(self.suffix))
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (seq, start) in enumerate(zip(sequences, prompt_lengths)):
            input_ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, start : len(seq)] = input_ids[i, start : len(seq)]
            attention_mask[i, : len(seq)] = 1
        if self.features is not None:
            return CaptionBatch(input_ids, attention_mask, labels, image_features=self.features[list(rows)])
        return CaptionBatch(input_ids, attention_mask, labels, pixel_values=self.pixel_values(rows))


def vision_features(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision tower's features that LLaVA projects (``[B, n, vision_dim]``): the configured
    layer, CLS token dropped (``"default"`` selection, as :func:`~mmspec.training.captioner_model.build_captioner` configures)."""
    out = model.model.vision_tower(pixel_values.to(model.device), output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def caption_loss(model: LlavaForConditionalGeneration, batch: CaptionBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced next-token cross-entropy over the answer tokens, and the share of those
    tokens the model's argmax predicts (token accuracy).

    With ``batch.image_features`` the projected features are merged into the token embeddings
    here, as LLaVA's forward does with the vision tower's output. The batch is moved to the
    model's device.
    """
    batch = batch.to(model.device)
    if batch.image_features is not None:
        embeds = model.get_input_embeddings()(batch.input_ids)
        projected = model.model.multi_modal_projector(batch.image_features)
        is_image = (batch.input_ids == model.config.image_token_id)[..., None]
        embeds = embeds.masked_scatter(is_image, projected.to(embeds.dtype))
        logits = model(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits
    else:
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
        ).logits
    logits, targets = logits[:, :-1], batch.labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    scored = targets != IGNORE_INDEX
    accuracy = (logits.argmax(-1) == targets)[scored].float().mean()
    return loss, accuracy


def _chunks(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]
