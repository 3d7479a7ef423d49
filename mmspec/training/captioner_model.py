"""The reference captioner's tokenizer, processor and LLaVA model (built from scratch or around a
pretrained language model), with the conversation formats and special tokens they share; the
recipe is :mod:`mmspec.training.captioner`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
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

try:  # recent transformers name the PIL backend; importing it directly avoids a fallback warning
    from transformers.models.clip.image_processing_pil_clip import (
        CLIPImageProcessorPil as _ImageProcessor,
    )
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


# ---------------------------------------------------------------------------------------- tokenizer
def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Words split at whitespace, with sentence punctuation as words of its own ("image?" ->
    "image", "?"); hyphenated names ("high-speed") stay one word."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(r"[?.,!]"), behavior="isolated"),
        ]
    )


def build_caption_tokenizer(texts: Sequence[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is :data:`SPECIAL_TOKENS` (ids 0-4, in that order)
    followed by every word of ``texts`` and of the chat template, sorted.

    Decoding joins words with spaces and re-attaches the split punctuation, so a caption decodes to
    exactly its text. (Not the WordPiece decoder's own clean-up: it also rewrites "do not" as
    "don't", and "do not litter symbol" is an emoji name.) Unknown words encode as ``<unk>``.
    """
    pre = _pre_tokenizer()
    template_words = ("USER:", "ASSISTANT:")
    words = sorted(
        {w for text in (*texts, *template_words) for w, _ in pre.pre_tokenize_str(text)} - set(SPECIAL_TOKENS)
    )
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.Sequence(
        [
            decoders.WordPiece(prefix="##", cleanup=False),  # no word starts with "##": joins with spaces
            *(decoders.Replace(f" {mark}", mark) for mark in "?.,!"),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[IMAGE_TOKEN],
        padding_side="left",  # left, as HF generate wants
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_caption_processor(
    tokenizer: PreTrainedTokenizerBase, image_size: int, patch_size: int, chat_template: str = CHAT_TEMPLATE
) -> LlavaProcessor:
    """The LLaVA processor: images resized (shortest edge) and centre-cropped to ``image_size``,
    CLIP normalisation, ``<image>`` expanded to one token per patch; ``chat_template`` formats the
    prompts (:data:`CHAT_TEMPLATE`, or :data:`CHATML_TEMPLATE` for a ChatML language model)."""
    image_processor = _ImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_resize=True,
        do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template,
    )


def chat_prompt(processor: LlavaProcessor, question: str) -> str:
    """The generation prompt for one image and ``question`` (what :class:`~mmspec.pipelines.vlm.VLMPipeline` builds)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


# ---------------------------------------------------------------------------------------- model
def build_captioner(
    config: CaptionerModelConfig, image_size: int, tokenizer: PreTrainedTokenizerFast
) -> LlavaForConditionalGeneration:
    """A randomly initialised LLaVA model for ``tokenizer``'s vocabulary (seed torch first)."""
    vision = _vision_config(config, image_size)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (("pad", PAD), ("bos", BOS), ("eos", EOS))}
    num_patches = (image_size // config.patch_size) ** 2
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_dim,
        intermediate_size=config.text_mlp,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        num_key_value_heads=config.text_kv_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        pad_token_id=ids["pad"],
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        tie_word_embeddings=False,
    )
    llava = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=num_patches,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        # The last layer: with a few layers trained from scratch there is no "more general"
        # penultimate layer to prefer, as LLaVA does for a pretrained CLIP.
        vision_feature_layer=-1,
        tie_word_embeddings=False,
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
        hidden_size=config.vision_dim,
        intermediate_size=config.vision_mlp,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        image_size=image_size,
        patch_size=config.patch_size,
    )


def load_language_model(
    name: str, cache_dir: str | Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
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
        raise FileNotFoundError(
            f"language model {name!r}: expected {SMOLLM2!r} or a save_pretrained folder with config.json"
        )
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(name)


def add_image_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Add :data:`IMAGE_TOKEN` to ``tokenizer`` (in place) as a special token, unless it has it."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)


def build_captioner_from_lm(
    language_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: CaptionerModelConfig, image_size: int
) -> LlavaForConditionalGeneration:
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
        raise ValueError(
            f"the captioner's language model must be a Llama-architecture causal LM, got {text.model_type!r}"
        )
    if tokenizer.eos_token != "<|im_end|>" or "<|im_start|>" not in tokenizer.get_vocab():
        raise ValueError(
            "the language model's tokenizer must use ChatML (<|im_start|> ... <|im_end|>, with <|im_end|> as "
            f"its EOS token); its EOS token is {tokenizer.eos_token!r}"
        )
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
        text_config=text.to_dict(),
        vision_config=_vision_config(config, image_size),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(image_size // config.patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=bool(text.tie_word_embeddings),
    )
    model = LlavaForConditionalGeneration(llava)
    model.model.language_model.load_state_dict(language_model.model.state_dict())
    model.lm_head.load_state_dict(language_model.lm_head.state_dict())
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model
