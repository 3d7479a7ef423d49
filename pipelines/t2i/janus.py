"""Janus / Janus-Pro text-to-image (Chen et al. 2025, arXiv 2501.17811) through transformers'
``JanusForConditionalGeneration``, as an mmspec target and pipeline.

Image mode of transformers' ``generate(..., generation_mode="image")``: the prompt (ending with the
begin-of-image token) is run for a ``[cond ; uncond]`` pair of rows — the unconditional row is the
prompt with every token but BOS and BOI replaced by the pad token —, each image token is predicted by
``generation_head`` from the language model's last hidden state, classifier-free guidance combines
the two rows' raw logits (``uncond + scale * (cond - uncond)``), and the chosen token re-enters through
``generation_embeddings`` + ``generation_aligner``. :class:`JanusImageTarget` is exactly that over
mmspec's static cache (the Llama language model converted by the VLM path's
:func:`~mmspec.pipelines.vlm.decoder.convert_language_model`, with ``generation_head`` as its output
layer), so the causal loop runs the baseline, SJD, MC-SJD, EAGLE heads and the relaxed rules on it;
LANTERN / GSD read the VQ codebook (``vqmodel.quantize.embedding``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mmspec.drafters.factory import register_jacobi_methods
from mmspec.methods import MethodRegistry
from mmspec.sampling import SamplingConfig
from mmspec.types import PrefillOutput, TargetOutput

from ..base import postprocess_images
from ..vlm.decoder import RopeOffsetKVCache, convert_language_model
from .base import ImageTokenEmbedding, ImageTokenHead, T2IPipeline, register_eagle_method


@dataclass
class JanusPrompt:
    """Left-padded prompts as transformers' processor gives them: ``input_ids`` / ``attention_mask``
    ``[B, P]`` (each prompt ends with the begin-of-image token) and the unconditional twin
    ``uncond_ids`` ``[B, P]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    uncond_ids: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]


class JanusImageTarget(nn.Module):
    """The image-generation path of a ``JanusForConditionalGeneration`` over mmspec's static cache.

    ``vocab_size``: the VQ codebook size (image tokens). Caches keep ``[cond ; uncond]`` row pairs
    under CFG; left padding is blocked in the cache and RoPE positions count real tokens only (the
    per-row offset lives in the cache's ``rope_offsets``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        config = model.config
        self.decoder = convert_language_model(model.model.language_model, model.lm_head, config.text_config)
        self.decoder.output = model.model.generation_head  # image-token logits instead of text logits
        self.generation_embeddings = model.model.generation_embeddings
        self.vocab_size = config.vq_config.num_embeddings
        self.num_tokens = config.vision_config.num_image_tokens  # image tokens per image
        hidden = self.decoder.config.dim
        # An image token enters through its embedding and the aligner MLP; both are shared with EAGLE heads.
        self.image_embedding = ImageTokenEmbedding(
            nn.Sequential(self.generation_embeddings, model.model.generation_aligner), self.vocab_size, hidden
        )
        self.image_head = ImageTokenHead(self.decoder.output, hidden, self.vocab_size)

    def eagle_modules(self) -> tuple[ImageTokenEmbedding, ImageTokenHead]:
        """The image-token embedding (``generation_embeddings`` + ``generation_aligner``) and image head
        (``generation_head``) an EAGLE head shares."""
        return self.image_embedding, self.image_head

    def new_cache(self, batch_size: int, max_seq_len: int, cfg: bool = False) -> RopeOffsetKVCache:
        c, p = self.decoder.config, self.decoder.tok_embeddings.weight
        return RopeOffsetKVCache(
            c.n_layer,
            batch_size,
            c.n_kv_head,
            max_seq_len,
            c.head_dim,
            dtype=p.dtype,
            device=p.device,
            groups=2 if cfg else 1,
        )

    def _split(self, out: TargetOutput, groups: int) -> TargetOutput:
        if groups == 1:
            return out
        logits, uncond_logits = out.logits.chunk(2)
        hidden, uncond_hidden = out.hidden_states.chunk(2)
        return TargetOutput(logits, hidden, uncond_logits, uncond_hidden)

    def prefill(self, prompt: JanusPrompt, cache: RopeOffsetKVCache) -> PrefillOutput:
        """Write and commit the prompt (both CFG rows); the output predicts the first image token."""
        if prompt.batch_size != cache.batch_size:
            raise ValueError(f"the prompt has {prompt.batch_size} rows but the cache {cache.batch_size}")
        ids = prompt.input_ids if cache.groups == 1 else torch.cat([prompt.input_ids, prompt.uncond_ids])
        mask = prompt.attention_mask.to(torch.bool)  # [B, P]
        length = ids.shape[1]
        if length > cache.max_seq_len:
            raise ValueError(f"the cache holds {cache.max_seq_len} positions, fewer than the {length}-token prompt")
        cache.block_keys(~mask)
        pad = length - mask.sum(1)  # [B] left padding per row
        cache.rope_offsets.copy_(-pad)
        rope = (torch.arange(length, device=ids.device)[None] - pad[:, None]).clamp(min=0)  # [B, P]
        out = self.decoder.forward_embeds(self.decoder.tok_embeddings(ids), rope.repeat(cache.groups, 1), cache)
        cache.commit(torch.full((cache.batch_size,), length, dtype=torch.long, device=cache.device))
        last = TargetOutput(out.logits[:, -1:], out.hidden_states[:, -1:])
        return PrefillOutput(self._split(last, cache.groups), hidden_states_all=out.hidden_states[: cache.batch_size])

    def forward(
        self,
        tokens: torch.Tensor,  # [B, T] image-token ids
        positions: torch.Tensor,  # [B, T] cache slots (sequence positions)
        cache: RopeOffsetKVCache,
        attn_mask: torch.Tensor | None = None,  # [G*B, 1, T, S] bool, None = causal
    ) -> TargetOutput:
        """Run image tokens at the next ``T`` cache slots of both CFG rows (written, not committed)."""
        embeds = self.image_embedding(tokens).repeat(cache.groups, 1, 1)
        rope = positions + cache.rope_offsets[:, None]
        return self._split(
            self.decoder.forward_embeds(embeds, rope.repeat(cache.groups, 1), cache, attn_mask), cache.groups
        )

    __call__ = forward


#: Janus's speculative methods: SJD / MC-SJD (training-free) and EAGLE (a head trained for the target).
JANUS_METHODS = MethodRegistry("JanusImagePipeline")


register_jacobi_methods(JANUS_METHODS, lambda pipe: pipe.grid_size)
register_eagle_method(JANUS_METHODS, "`mmspec train-drafter --target-kind janus`")


class JanusImagePipeline(T2IPipeline):
    """Text-to-image with Janus / Janus-Pro, with or without speculative decoding.

    Args:
        model: a ``transformers.JanusForConditionalGeneration``.
        processor: a ``JanusProcessor`` (for ``prompt=``), or None (pass ``input_ids``).
        boi_token_id / pad_token_id / bos_token_id: default to the model's generation config
            (``generation_kwargs["boi_token_id"]``, ``pad_token_id``, ``bos_token_id``).
        eagle: an EAGLE head trained for this model (optional component; see :class:`T2IPipeline`).
    """

    methods = JANUS_METHODS
    model_class: ClassVar[str] = "JanusForConditionalGeneration"
    model_type: ClassVar[str] = "janus"

    def __init__(
        self,
        model: nn.Module,
        processor: Any = None,
        boi_token_id: int | None = None,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eagle: Any = None,
    ) -> None:
        gen = model.generation_config
        self.boi_token_id = (
            boi_token_id if boi_token_id is not None else (gen.generation_kwargs or {}).get("boi_token_id")
        )
        self.pad_token_id = pad_token_id if pad_token_id is not None else gen.pad_token_id
        self.bos_token_id = bos_token_id if bos_token_id is not None else gen.bos_token_id
        missing = [n for n in ("boi_token_id", "pad_token_id", "bos_token_id") if getattr(self, n) is None]
        if missing:
            raise ValueError(f"the model's generation config lacks {missing}: pass them to JanusImagePipeline")
        target = JanusImageTarget(model)
        side = math.isqrt(target.num_tokens)
        if side * side != target.num_tokens:
            raise ValueError(f"num_image_tokens ({target.num_tokens}) is not a square grid")
        self.grid_size = side
        self.token_grid = (side, side)  # the generated tokens in raster order (stats, heat-maps)
        super().__init__(model, target, processor, eagle)

    def rule_resources(self) -> dict:
        """The VQ codebook (LANTERN's latent neighbourhoods, GSD), the image-token embedding, the grid."""
        from ..llamagen.pipeline_llamagen import NEIGHBOUR_CACHE

        return {
            "codebook": self.model.model.vqmodel.quantize.embedding.weight.detach().float(),
            "token_embeddings": self.target.generation_embeddings.weight.detach().float(),
            "grid": (self.grid_size, self.grid_size),
            "cache_dir": NEIGHBOUR_CACHE,
            "memo": self._rule_memo,
        }

    def prompt_inputs(
        self,
        prompt: str | list[str] | None = None,
        input_ids: torch.Tensor | None = None,  # [B, P] left-padded, ending with BOI
        attention_mask: torch.Tensor | None = None,  # [B, P]
        cfg: bool = True,
    ) -> JanusPrompt:
        """Token ids (left-padded) and their unconditional twin, as transformers' image mode builds them
        (``cfg=False``: no twin, ``uncond_ids`` is the prompt itself and never runs)."""
        if prompt is not None:
            if input_ids is not None:
                raise ValueError("pass prompt or input_ids, not both")
            if self.processor is None:
                raise ValueError("prompt= needs the pipeline's processor (JanusProcessor); or pass input_ids")
            enc = self.processor(
                text=[prompt] if isinstance(prompt, str) else list(prompt),
                generation_mode="image",
                padding=True,
                return_tensors="pt",
            )
            input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
        if input_ids is None:
            raise ValueError("pass prompt (with a processor) or input_ids [B, P] ending with the begin-of-image token")
        input_ids = input_ids.to(self.device)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        if not bool((input_ids[:, -1] == self.boi_token_id).all()):  # left padding: the last column is real
            raise ValueError(
                f"each prompt must end with the begin-of-image token {self.boi_token_id} "
                "(JanusProcessor(..., generation_mode='image') appends it)"
            )
        if not cfg:  # no unconditional row runs: the twin is not built
            return JanusPrompt(input_ids, attention_mask, input_ids)
        keep = (input_ids == self.bos_token_id) | (input_ids == self.boi_token_id)
        uncond = torch.where(keep, input_ids, torch.full_like(input_ids, self.pad_token_id))
        return JanusPrompt(input_ids, attention_mask, uncond)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        input_ids: torch.Tensor | None = None,  # [B, P] left-padded, ending with BOI
        attention_mask: torch.Tensor | None = None,  # [B, P]
        guidance_scale: float = 5.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        speculative: str | None = None,
        num_draft_tokens: int = 8,
        acceptance: str | None = None,
        acceptance_options: dict | None = None,
        speculative_options: dict | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[JanusImagePipeline, int, None, dict], dict] | None = None,
        profile: bool = False,
    ):
        """Generate images (the config's ``num_image_tokens`` tokens each) for ``prompt`` or ``input_ids``.

        ``guidance_scale`` > 1 runs the ``[cond ; uncond]`` pair (Janus's default 5); ``temperature`` 0
        is greedy (transformers' ``do_sample=False``). ``speculative``: None (baseline), ``"sjd"``,
        ``"mc-sjd"`` or ``"eagle"`` (with an EAGLE head); ``acceptance``: ``"exact"`` (default), ``"greedy"``, ``"lantern"``, ``"gsd"``.
        ``output_type``: ``"pil"``, ``"np"``, ``"pt"`` (decoded by Janus's VQ) or ``"tokens"`` (no decode).
        ``callback_on_step_end``: ``f(pipe, step, None, {"num_generated": [B], "tokens": [B, N]})`` after every
        verify step (diffusers convention; ``tokens``: the raster-order image tokens so far, -1 where not
        generated yet). ``set_progress_bar_config(disable=True)`` hides the progress bar. ``profile``: time
        the loop's phases (``stats.draft_time`` / ``verify_time`` / ``accept_time``), for breakdowns.
        """
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, guidance_scale=guidance_scale)
        janus_prompt = self.prompt_inputs(prompt, input_ids, attention_mask, cfg=sampling.uses_cfg)
        spec = self.resolve_speculation(speculative, speculative_options, acceptance, acceptance_options)
        out = self.generate_tokens(
            janus_prompt,
            janus_prompt.input_ids.shape[1],
            self.target.num_tokens,
            sampling,
            spec,
            num_draft_tokens,
            generator,
            callback_on_step_end,
            profile,
        )
        return self.finish(out.tokens.view(-1, self.grid_size, self.grid_size), out.stats, output_type, return_dict)

    def decode(self, codes: torch.Tensor, output_type: str):
        """Image tokens ``codes [B, h, w]`` through Janus's VQ decoder, as ``output_type``."""
        pixels = self.model.decode_image_tokens(codes.flatten(1))  # [B, H, W, 3] in [-1, 1]
        return postprocess_images(pixels.permute(0, 3, 1, 2), output_type, extra=("tokens",))
