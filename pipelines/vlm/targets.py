"""VLM targets: transformers vision-language models wrapped for mmspec's draft/verify loop.

A target keeps the HF vision tower and projector (``encoder``: the HF ``model.model``, run once per
prompt in :meth:`VLMTarget.prefill`) and the language model converted into mmspec's static-cache
decoder (:mod:`.decoder`). Families differ in two hooks only: which image inputs the vision tower
takes (:attr:`VLMTarget.image_inputs`) and how prompt tokens get RoPE positions
(:meth:`VLMTarget.rope_positions`: 1-D for LLaVA, M-RoPE t/h/w ids for Qwen2-VL / Qwen2.5-VL).
Families are looked up by ``config.model_type`` in :data:`VLM_FAMILIES`.

Prompts are right-padded (:class:`VLMPrompt`, a :class:`~mmspec.types.TokenPrompt`): row ``b``'s
real tokens occupy cache slots ``[0, lengths[b])``, so sequence position = cache slot = HF's text
position; the padded tail is written during prefill but never committed (invisible, then
overwritten). Processor output, left-padded or not, is converted by :meth:`VLMPrompt.from_processor`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace

import torch
import transformers
from torch import nn
from transformers import AutoConfig
from transformers.utils import ModelOutput

from mmspec.checkpoint_io import check_safetensors_files
from mmspec.types import PrefillOutput, TargetOutput, TokenPrompt

from .decoder import DraftVocabHead, RopeOffsetKVCache, VLMDecoder, convert_language_model


@dataclass
class VLMPrompt(TokenPrompt):
    """A right-padded batch of VLM prompts: what :meth:`VLMTarget.prefill` takes.

    ``tokens [B, P]`` / ``lengths [B]``: token ids with every image placeholder already expanded to
    one token per image feature (as processors emit them). Image inputs, in prompt order across the
    batch, exactly as the family's processor returns them:
    ``pixel_values``: LLaVA ``[N, 3, h, w]``, LLaVA-NeXT ``[N, patches, 3, h, w]``, Qwen2-VL /
    Qwen2.5-VL ``[patches, C * t * p * p]``; ``image_sizes``: ``[N, 2]`` (LLaVA-NeXT);
    ``image_grid_thw``: ``[N, 3]`` (Qwen); ``mm_token_type_ids``: ``[B, P]`` 0 text / 1 image /
    2 video (Qwen; derived from the image token when absent). ``image_features``: ``[n, H]``
    projected features of all image tokens in order; when set, prefill skips the vision tower
    (:meth:`VLMTarget.encode_images` fills it so a target and a model drafter share one encoding).
    ``features_from``: the vision modules that computed ``image_features`` (set by
    :meth:`VLMTarget.encode_images`: :meth:`VLMTarget.vision_modules`); another model reuses them
    only if it has those very modules, otherwise it encodes ``pixel_values`` itself (a 2B draft VLM
    must not embed a 7B's features; :func:`share_vision_modules` lets a draft with the target's own
    vision weights use the target's modules). None: features given by the caller, trusted as this
    model's own.
    """

    pixel_values: torch.Tensor | None = None
    image_sizes: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    mm_token_type_ids: torch.Tensor | None = None
    image_features: torch.Tensor | None = None
    features_from: tuple[nn.Module, ...] | None = None

    @classmethod
    def from_processor(cls, batch: Mapping[str, torch.Tensor]) -> VLMPrompt:
        """Convert a processor's output (``input_ids``, ``attention_mask``, image tensors; left or
        right padded) into a right-padded prompt."""
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        # A stable sort on "is padding" moves each row's real tokens to the front, in order.
        order = torch.argsort((mask == 0).to(torch.int8), dim=1, stable=True)  # [B, P]
        types = batch.get("mm_token_type_ids")
        return cls(
            tokens=ids.gather(1, order),
            lengths=mask.sum(1).to(torch.long),
            pixel_values=batch.get("pixel_values"),
            image_sizes=batch.get("image_sizes"),
            image_grid_thw=batch.get("image_grid_thw"),
            mm_token_type_ids=None if types is None else types.gather(1, order),
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> VLMPrompt:
        """Move every tensor to ``device``; floating ones (pixels, features) also to ``dtype``."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, dtype) if dtype is not None and value.is_floating_point() else value.to(device)
            moved[f.name] = value
        return type(self)(**moved)


class VLMTarget(nn.Module):
    """A transformers VLM as an mmspec target (the contract of :class:`mmspec.types.Target`).

    Args:
        encoder: the HF ``model.model`` (vision tower, projector, ``get_image_features``); its
            language model may have been released after conversion.
        decoder: the converted language model.
        config: the HF model config.
        eos_token_ids: every id that ends a reply (HF ``generation_config.eos_token_id``).
        generation_defaults: logits processors the checkpoint asks for (``repetition_penalty``, ...).
        draft_vocab: ``[V']`` target ids the LM head scores, for a draft VLM
            (:class:`~mmspec.pipelines.vlm.decoder.DraftVocabHead`: other ids get logit ``-inf``);
            None: the whole vocabulary.

    Subclasses set :attr:`image_inputs` and, for M-RoPE, override :meth:`rope_positions`.
    """

    #: :class:`VLMPrompt` fields passed to ``encoder.get_image_features`` besides ``pixel_values``.
    image_inputs: tuple[str, ...] = ()
    #: Attributes of ``encoder`` that compute image features (:meth:`vision_modules`).
    vision_parts: tuple[str, ...] = ()

    def __init__(
        self,
        encoder: nn.Module,
        decoder: VLMDecoder,
        config,
        eos_token_ids: tuple[int, ...] = (),
        generation_defaults: Mapping[str, float] | None = None,
        draft_vocab: torch.Tensor | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.config = config
        self.image_token_id = int(config.image_token_id)
        self.eos_token_ids = tuple(eos_token_ids)
        #: logits processors the checkpoint's ``generation_config.json`` asks for and mmspec applies
        #: (:func:`generation_defaults`); the pipeline uses them unless a call overrides them.
        self.generation_defaults = dict(generation_defaults or {})
        self.draft_head = None if draft_vocab is None else DraftVocabHead(decoder.output, draft_vocab)

    @classmethod
    def from_hf(cls, model: nn.Module, release_language_model: bool = False) -> VLMTarget:
        """Wrap an HF ``*ForConditionalGeneration`` model, converting its language model.

        ``release_language_model``: drop the HF language model afterwards (only for a model the
        caller no longer uses: its weights now live in the decoder). Otherwise ``model`` is left
        untouched and shares the unchanged weight tensors with the decoder.
        """
        lm_head = model.get_output_embeddings()
        if lm_head is None:
            raise ValueError(f"{type(model).__name__} has no LM head: pass the *ForConditionalGeneration model")
        decoder = convert_language_model(model.model.language_model, lm_head, model.config.text_config)
        if release_language_model:
            model.model.language_model = None
        eos = model.generation_config.eos_token_id
        eos_ids = () if eos is None else tuple([eos] if isinstance(eos, int) else eos)
        return cls(model.model, decoder, model.config, eos_ids, generation_defaults(model.generation_config))

    def with_decoder(self, decoder: VLMDecoder) -> VLMTarget:
        """The same family and vision encoder (shared) with another language model: e.g. a smaller
        or perturbed decoder as a :class:`~mmspec.drafters.ModelDrafter` model."""
        return type(self)(self.encoder, decoder, self.config, self.eos_token_ids, self.generation_defaults)

    def with_draft_vocab(self, draft_vocab: torch.Tensor | Sequence[int] | None) -> VLMTarget:
        """The same model (weights shared) scoring only ``draft_vocab``'s ids (None: all): a draft VLM
        whose LM head costs ``V'`` rows per draft token instead of ``V``."""
        return type(self)(
            self.encoder, self.decoder, self.config, self.eos_token_ids, self.generation_defaults, draft_vocab
        )

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
        """An empty cache for ``batch_size`` prompts of up to ``max_seq_len`` tokens in all."""
        return self.decoder.new_cache(batch_size, max_seq_len, cfg)

    def prefill(self, prompt: VLMPrompt, cache: RopeOffsetKVCache) -> PrefillOutput:
        """Encode the images, write and commit the prompt, set each row's RoPE offset; return each
        row's last-position output (``hidden_states_all``: ``[B, P, H]`` prompt features)."""
        embeds = self.embed_prompt(prompt)  # [B, P, H]
        positions, offsets = self.rope_positions(prompt)
        cache.rope_offsets.copy_(offsets)
        features = self.decoder.features(embeds, positions, cache)  # [B, P, H]
        hidden = self.decoder.commit_prompt(features, prompt.lengths, cache)  # [B, 1, H]
        return PrefillOutput(
            TargetOutput(logits=self._logits(hidden), hidden_states=hidden), hidden_states_all=features
        )

    def forward(
        self,
        tokens: torch.Tensor,  # [B, T]
        positions: torch.Tensor,  # [B, T] sequence positions (= cache slots)
        cache: RopeOffsetKVCache,
        attn_mask: torch.Tensor | None,  # [B, 1, T, S] or None (causal)
    ) -> TargetOutput:
        """Run generated / draft tokens. Text after the prompt has t = h = w = position + the row's
        RoPE offset (HF's ``rope_deltas``; zero for 1-D RoPE), tree nodes included."""
        embeds = self.decoder.tok_embeddings(tokens)
        h = self.decoder.features(embeds, positions + cache.rope_offsets[:, None], cache, attn_mask)
        return TargetOutput(logits=self._logits(h), hidden_states=h)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, T, V] float32
        return self.decoder.output(h).float() if self.draft_head is None else self.draft_head(h)

    # ------------------------------------------------------------------ prompt encoding
    def image_features(self, prompt: VLMPrompt) -> torch.Tensor:
        """Projected features ``[n, H]`` of every image token of the batch, in prompt order."""
        extra = {name: getattr(prompt, name) for name in self.image_inputs}
        out = self.encoder.get_image_features(pixel_values=prompt.pixel_values, **extra)
        # transformers 5 returns a ModelOutput whose pooler_output holds the per-image features;
        # earlier releases returned them directly.
        per_image = out.pooler_output if isinstance(out, ModelOutput) else out
        return torch.cat(list(per_image), dim=0)

    def encode_images(self, prompt: VLMPrompt) -> VLMPrompt:
        """``prompt`` with :attr:`VLMPrompt.image_features` computed by this model's encoder (no-op
        without images, or when they already are this encoder's / the caller's own features).
        Features another encoder computed are replaced by this one's (issue 16, bug 2)."""
        if prompt.pixel_values is None:
            return prompt
        mine = self.vision_modules()
        if prompt.image_features is not None and (prompt.features_from is None or prompt.features_from == mine):
            return prompt
        return replace(prompt, image_features=self.image_features(prompt), features_from=mine)

    def vision_modules(self) -> tuple[nn.Module, ...]:
        """The modules that turn pixels into this model's image features (the family's
        :attr:`vision_parts` of the encoder, or the whole encoder): features computed by these very
        modules are reused as they are (:meth:`encode_images`)."""
        if not self.vision_parts:
            return (self.encoder,)
        return tuple(getattr(self.encoder, name) for name in self.vision_parts)

    def embed_prompt(self, prompt: VLMPrompt) -> torch.Tensor:
        """Input embeddings ``[B, P, H]``: token embeddings with image features at image tokens."""
        tokens = prompt.tokens
        valid = torch.arange(tokens.shape[1], device=tokens.device)[None] < prompt.lengths[:, None]
        is_image = (tokens == self.image_token_id) & valid  # [B, P]
        embeds = self.decoder.tok_embeddings(tokens)
        features = self.encode_images(prompt).image_features
        num_tokens = int(is_image.sum())  # deliberate sync: once per prompt, to check the images
        num_features = 0 if features is None else features.shape[0]
        if num_tokens != num_features:
            raise ValueError(
                f"the prompt has {num_tokens} image tokens but the images give {num_features} features: "
                "build prompts with this model's processor (it expands each image placeholder)"
            )
        if features is None:
            return embeds
        if features.shape[-1] != embeds.shape[-1]:
            raise ValueError(
                f"the image features have width {features.shape[-1]} but this language model's embeddings have "
                f"{embeds.shape[-1]}: features from another VLM's vision tower cannot be used (pass pixel values)"
            )
        return embeds.masked_scatter(is_image[..., None], features.to(embeds.dtype))

    def rope_positions(self, prompt: VLMPrompt) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE positions of the prompt tokens (``[B, P]``, or ``[3, B, P]`` for M-RoPE) and each
        row's offset ``[B]`` for the tokens after the prompt. 1-D RoPE: the sequence positions."""
        tokens = prompt.tokens
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return positions, torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)


#: ``generation_config`` fields that change which token greedy / sampled decoding picks and that
#: mmspec does not implement, with the value that means "off". A checkpoint setting one gets a warning.
UNSUPPORTED_GENERATION_FIELDS: dict[str, object] = {
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "encoder_repetition_penalty": 1.0,
    "bad_words_ids": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "min_length": 0,
    "min_new_tokens": None,
    "exponential_decay_length_penalty": None,
    "num_beams": 1,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
}


def generation_defaults(generation_config) -> dict[str, float]:
    """The logits processors of an HF ``GenerationConfig`` that mmspec applies (in target and
    drafter alike): ``repetition_penalty``. Fields it cannot reproduce
    (:data:`UNSUPPORTED_GENERATION_FIELDS`) set to anything but "off" raise a ``UserWarning`` naming
    them: outputs would differ from ``model.generate``. Sampling fields (``temperature``, ``top_k``,
    ``top_p``, ``do_sample``) are not read: mmspec's pipelines take them from the call (greedy by
    default)."""
    defaults = {}
    penalty = getattr(generation_config, "repetition_penalty", None)
    if penalty is not None and float(penalty) != 1.0:
        defaults["repetition_penalty"] = float(penalty)
    ignored = []
    for name, off in UNSUPPORTED_GENERATION_FIELDS.items():
        value = getattr(generation_config, name, off)
        if value is not None and value != off and not (isinstance(value, (list, tuple, dict)) and not value):
            ignored.append(f"{name}={value!r}")
    if ignored:
        warnings.warn(
            f"the checkpoint's generation_config sets {', '.join(ignored)}, which mmspec does not implement: "
            "its outputs will differ from model.generate for those settings (repetition_penalty is applied)",
            UserWarning,
            stacklevel=3,
        )
    return defaults


def share_vision_modules(draft: VLMTarget, target: VLMTarget) -> bool:
    """Point ``draft``'s vision modules at ``target``'s when they hold the same weights (same family,
    every tensor equal, e.g. a draft VLM built on the target's frozen vision tower and projector, as
    the captioner recipe's): one image encoding then serves both per prompt, and the copy's memory
    is freed. Returns whether the two share them now; draft models with their own vision weights
    are left as they are."""
    if type(draft) is not type(target) or not draft.vision_parts:
        return False
    pairs = list(zip(draft.vision_modules(), target.vision_modules()))
    for mine, theirs in pairs:
        if mine is theirs:
            continue
        a, b = mine.state_dict(), theirs.state_dict()
        if a.keys() != b.keys() or not all(
            a[k].dtype == b[k].dtype and a[k].device == b[k].device and torch.equal(a[k], b[k]) for k in a
        ):
            return False
    for name, (_, theirs) in zip(draft.vision_parts, pairs):
        setattr(draft.encoder, name, theirs)
    return True


class LlavaTarget(VLMTarget):
    """LLaVA-1.5 (Liu et al. 2023, arXiv 2310.03744) and LLaVA-NeXT (Liu et al. 2024): vision tower +
    MLP projector, 1-D RoPE. Image sizes drive LLaVA-NeXT's any-resolution tiling (and Pixtral-tower
    LLaVA checkpoints); CLIP-tower LLaVA has none."""

    image_inputs = ("image_sizes",)
    vision_parts = ("vision_tower", "multi_modal_projector")


class Qwen2VLTarget(VLMTarget):
    """Qwen2-VL (arXiv 2409.12191) and Qwen2.5-VL (arXiv 2502.13923): M-RoPE positions."""

    image_inputs = ("image_grid_thw",)
    vision_parts = ("visual",)

    def rope_positions(self, prompt: VLMPrompt) -> tuple[torch.Tensor, torch.Tensor]:
        """t/h/w ids ``[3, B, P]`` and offsets ``[B]`` from HF's own ``get_rope_index`` (padding
        excluded through the attention mask, so right padding gives HF's per-row values)."""
        tokens = prompt.tokens
        valid = (torch.arange(tokens.shape[1], device=tokens.device)[None] < prompt.lengths[:, None]).long()
        types = prompt.mm_token_type_ids
        if types is None:
            types = (tokens == self.image_token_id).int()
        positions, deltas = self.encoder.get_rope_index(
            input_ids=tokens,
            mm_token_type_ids=types,
            image_grid_thw=prompt.image_grid_thw,
            attention_mask=valid,
        )
        return positions, deltas.reshape(-1).to(torch.long)


@dataclass(frozen=True)
class VLMFamily:
    """A supported VLM family: its transformers class (by name, imported on use) and adapter."""

    hf_class_name: str
    target_class: type[VLMTarget]

    def hf_class(self) -> type:
        return getattr(transformers, self.hf_class_name)


#: HF ``config.model_type`` -> family.
VLM_FAMILIES: dict[str, VLMFamily] = {
    "llava": VLMFamily("LlavaForConditionalGeneration", LlavaTarget),
    "llava_next": VLMFamily("LlavaNextForConditionalGeneration", LlavaTarget),
    "qwen2_vl": VLMFamily("Qwen2VLForConditionalGeneration", Qwen2VLTarget),
    "qwen2_5_vl": VLMFamily("Qwen2_5_VLForConditionalGeneration", Qwen2VLTarget),
}


def vlm_family(model_type: str) -> VLMFamily:
    """The family registered for ``model_type``; ``ValueError`` listing the supported ones otherwise."""
    family = VLM_FAMILIES.get(model_type)
    if family is None:
        raise ValueError(
            f"unsupported VLM architecture {model_type!r}; supported model types: {', '.join(sorted(VLM_FAMILIES))}"
        )
    return family


def load_vlm_target(
    path_or_model: str | os.PathLike | nn.Module,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> VLMTarget:
    """Load a VLM target from a checkpoint directory / hub id, or wrap an HF model instance.

    Args:
        path_or_model: a ``save_pretrained`` directory or hub id (the HF model is loaded, converted
            and its language model released), or a loaded ``*ForConditionalGeneration`` model
            (kept intact, e.g. to compare against ``model.generate``; it is moved in place when
            ``dtype`` / ``device`` are given).
        dtype: weights dtype (None: the checkpoint's / the model's).
        device: where the target runs (None: CPU for paths, the model's device for instances).

    Raises:
        ValueError: the architecture is not one of :data:`VLM_FAMILIES`, the weights do not match
            the config (missing, unexpected or mis-shaped tensors; the message names them), or a
            weights file is not a valid safetensors file (truncated or corrupt; the message names it).
    """
    if isinstance(path_or_model, (str, os.PathLike)):
        family = vlm_family(AutoConfig.from_pretrained(path_or_model).model_type)
        if os.path.isdir(path_or_model):  # transformers' SafetensorError would not say which file
            check_safetensors_files(path_or_model)
        model, info = family.hf_class().from_pretrained(path_or_model, dtype=dtype, output_loading_info=True)
        problems = {
            kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
        }
        if any(problems.values()):  # transformers only warns, then runs with random weights
            found = ", ".join(
                f"{kind.replace('_', ' ')}: {keys[:8]}{' ...' if len(keys) > 8 else ''} ({len(keys)})"
                for kind, keys in problems.items()
                if keys
            )
            raise ValueError(
                f"the weights of {family.hf_class().__name__} in {path_or_model} do not match its config "
                f"({found}): the folder holds another model's weights"
            )
        model = model.eval()
        if device is not None:
            model.to(device)
        return family.target_class.from_hf(model, release_language_model=True)
    family = vlm_family(path_or_model.config.model_type)
    if dtype is not None or device is not None:
        path_or_model.to(device=device, dtype=dtype)
    return family.target_class.from_hf(path_or_model)
