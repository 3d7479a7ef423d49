"""``LlamaGenPipeline``: class- or text-conditional image generation with LlamaGen, with or without
speculative decoding, through mmspec's one draft/verify loop.

``speculative=None`` is the plain autoregressive baseline (static KV cache; the same target,
cache and sampling code as every speculative mode), for A/B comparisons on the same seed.
Speculative methods are looked up in :data:`SPECULATIVE_METHODS`; acceptance rules by name in
``mmspec.acceptance`` — both swap without touching the loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from mmspec.acceptance import AcceptanceRule, get_acceptance_rule
from mmspec.cache import StaticKVCache
from mmspec.compile import CompiledTarget
from mmspec.drafters import EagleDrafter, EagleHead, JacobiDrafter, ModelDrafter
from mmspec.drafters.eagle import TreeConfig, target_fingerprint
from mmspec.loop import required_cache_len, speculative_generate
from mmspec.relaxed import GSDAcceptance, LanternAcceptance, load_or_build_neighbours
from mmspec.sampling import SamplingConfig
from mmspec.stats import SpecStats

from ..validation import check_class_labels, check_llamagen_call
from .modeling_gpt import LlamaGenCondition, LlamaGenGPT
from .modeling_upsampler import LlamaGenTokenUpsampler
from .modeling_vq import LlamaGenVQ
from .mulo import mulo_for_pipeline


@dataclass
class LlamaGenPipelineOutput(BaseOutput):
    """``images``: list of PIL images, ``np.ndarray [B, H, W, 3]`` or ``torch.Tensor [B, 3, H, W]``
    in [0, 1] (``output_type``); ``tokens``: ``[B, h, w]`` the generated token grid;
    ``stats``: :class:`~mmspec.stats.SpecStats` (``token_source`` / ``token_step`` reshape to the grid)."""

    images: Any
    tokens: torch.Tensor
    stats: SpecStats


@dataclass(frozen=True)
class SpeculativeOptions:
    """Knobs of the speculative methods (only the chosen method's knobs matter)."""

    sjd_init: str = "random"  # SJD fresh guesses: "random" or "copy" (the token above)
    eagle_tree: TreeConfig | None = None  # EAGLE-2 dynamic tree budget; None = a chain


#: name -> factory(pipeline, options) building the drafter for one call.
SPECULATIVE_METHODS: dict[str, Callable[["LlamaGenPipeline", SpeculativeOptions], Any]] = {}


def register_speculative_method(name: str):
    def wrap(factory):
        SPECULATIVE_METHODS[name] = factory
        return factory

    return wrap


@register_speculative_method("sjd")
def _sjd(pipe: "LlamaGenPipeline", options: SpeculativeOptions) -> JacobiDrafter:
    """Speculative Jacobi decoding (training-free)."""
    grid = pipe.target.grid_size
    return JacobiDrafter(pipe.target.vocab_size, init=options.sjd_init, copy_offset=grid if options.sjd_init == "copy" else None)


@register_speculative_method("draft-model")
def _draft_model(pipe: "LlamaGenPipeline", options: SpeculativeOptions) -> ModelDrafter:
    """A smaller LlamaGen GPT with the same codebook as the drafter component."""
    if not isinstance(pipe.drafter, LlamaGenGPT):
        raise ValueError("speculative='draft-model' needs a smaller LlamaGenGPT as the pipeline's `drafter` component")
    return ModelDrafter(pipe.drafter)


@register_speculative_method("eagle")
def _eagle(pipe: "LlamaGenPipeline", options: SpeculativeOptions) -> EagleDrafter:
    """EAGLE feature-level drafting (chain, or an EAGLE-2 dynamic tree)."""
    if pipe.eagle_head is None:
        raise ValueError("speculative='eagle' needs an EAGLE head: pipe.load_eagle_head(path) "
                         "(train one with `mmspec train-drafter --target-kind llamagen`)")
    return EagleDrafter(pipe.eagle_head, tree=options.eagle_tree)


#: name -> f(pipe, condition, sampling, generator, acceptance, acceptance_options) -> (tokens [B, h, w],
#: SpecStats): methods that replace the core's prefix-commit loop (MuLo-SD repairs rejections
#: locally and non-causally, keeping accepted tokens after a rejection).
GRID_METHODS: dict[str, Callable[..., tuple[torch.Tensor, SpecStats]]] = {"mulo": mulo_for_pipeline}

#: Default folder for LANTERN neighbour tables (one file per codebook hash and k).
NEIGHBOUR_CACHE = Path(os.environ.get("MMSPEC_CACHE", Path.home() / ".cache" / "mmspec")) / "neighbours"


def _lantern(pipe: "LlamaGenPipeline", options: dict) -> LanternAcceptance:
    """LANTERN / LANTERN++ over this pipeline's VQ codebook neighbourhoods (table cached on disk);
    ``k`` defaults to LANTERN's 1000 neighbours, capped at the codebook size - 1."""
    k = options.pop("k", min(1000, pipe.target.vocab_size - 1))
    cache = options.pop("neighbour_cache", NEIGHBOUR_CACHE)
    key = ("lantern", k)
    if key not in pipe._tables:
        pipe._tables[key] = load_or_build_neighbours(pipe.vq.codebook_embeddings().detach().float(), k, cache)
    return LanternAcceptance(pipe._tables[key], k=k, **options)


def _gsd(pipe: "LlamaGenPipeline", options: dict) -> GSDAcceptance:
    """GSD with distances in the VQ codebook (``embedding="codebook"``) or the GPT's token embedding."""
    embedding = options.pop("embedding", "codebook")
    tables = {"codebook": lambda: pipe.vq.codebook_embeddings(), "tokens": lambda: pipe.target.tok_embeddings.weight}
    if embedding not in tables:
        raise ValueError(f"GSD embedding must be one of {sorted(tables)}, got {embedding!r}")
    return GSDAcceptance(tables[embedding]().detach().float(), **options)


#: Acceptance rules that need the pipeline's models (codebook, embeddings) to be built by name.
PIPELINE_RULES: dict[str, Callable[["LlamaGenPipeline", dict], AcceptanceRule]] = {"lantern": _lantern, "gsd": _gsd}


class LlamaGenPipeline(DiffusionPipeline):
    """LlamaGen (Sun et al. 2024, arXiv 2406.06525) with speculative decoding.

    Components: ``target`` (:class:`LlamaGenGPT`), ``vq`` (:class:`LlamaGenVQ`) and, optional, two
    drafters: ``drafter`` (a smaller ``LlamaGenGPT`` over the same grid, ``speculative="draft-model"``)
    and ``low_res_drafter`` (a ``LlamaGenGPT`` over a smaller grid of the same codebook,
    ``speculative="mulo"``), plus ``upsampler`` (a :class:`LlamaGenTokenUpsampler` from the
    low-resolution grid to the target's, MuLo-SD's ``upsampler="learned"``). EAGLE heads attach
    with :meth:`load_eagle_head`.
    """

    model_cpu_offload_seq = "target->vq"
    _optional_components = ["drafter", "low_res_drafter", "upsampler"]

    def __init__(self, target: LlamaGenGPT, vq: LlamaGenVQ, drafter: Any = None,
                 low_res_drafter: LlamaGenGPT | None = None, upsampler: LlamaGenTokenUpsampler | None = None) -> None:
        super().__init__()
        if target.config.vocab_size != vq.config.codebook_size:
            raise ValueError(
                f"target vocabulary ({target.config.vocab_size}) does not match the VQ codebook "
                f"({vq.config.codebook_size}): use the tokenizer the GPT was trained with"
            )
        for name, model in (("drafter", drafter), ("low_res_drafter", low_res_drafter), ("upsampler", upsampler)):
            if model is not None and getattr(model.config, "vocab_size", target.config.vocab_size) != target.config.vocab_size:
                raise ValueError(
                    f"{name} vocabulary ({model.config.vocab_size}) does not match the target's "
                    f"({target.config.vocab_size}): a drafter must use the target's VQ codebook"
                )
        if low_res_drafter is not None and low_res_drafter.config.block_size >= target.config.block_size:
            raise ValueError(
                f"low_res_drafter must draft a smaller grid than the target's: its block_size is "
                f"{low_res_drafter.config.block_size}, the target's {target.config.block_size} "
                "(a same-size GPT belongs in `drafter`)"
            )
        if upsampler is not None and low_res_drafter is not None:
            side = low_res_drafter.grid_size * upsampler.config.scale
            if side != target.grid_size:
                raise ValueError(
                    f"the upsampler scales the low_res_drafter's {low_res_drafter.grid_size}x{low_res_drafter.grid_size} "
                    f"grid by {upsampler.config.scale} to {side}x{side}, but the target's grid is "
                    f"{target.grid_size}x{target.grid_size}: train the upsampler for this pair"
                )
        self.register_modules(target=target, vq=vq, drafter=drafter, low_res_drafter=low_res_drafter,
                              upsampler=upsampler)
        self.eagle_head: EagleHead | None = None  # set by load_eagle_head()
        self._tables: dict[tuple, torch.Tensor] = {}  # LANTERN neighbour tables, built once per k
        self._compiled: CompiledTarget | None = None  # set by enable_compile()
        self._caches: dict[tuple, StaticKVCache] = {}  # reused across calls (CUDA graphs need fixed addresses)

    def load_eagle_head(self, path: str) -> "LlamaGenPipeline":
        """Attach an EAGLE head trained for this exact target (checked by a fingerprint of the
        target's LM head: a head for another model is a clear error). Returns the pipeline."""
        self.eagle_head = EagleHead.from_pretrained(
            path, self.target.tok_embeddings, self.target.output, target_fingerprint(self.target.output)
        ).eval()
        return self

    def acceptance_rule(self, name: str, **options) -> AcceptanceRule:
        """The acceptance rule ``name`` with ``options``; rules that need this pipeline's codebook or
        embeddings (``"lantern"``, ``"gsd"``) get them here."""
        if name in PIPELINE_RULES:
            return PIPELINE_RULES[name](self, dict(options))
        return get_acceptance_rule(name, **options)

    def enable_compile(self, mode: str | None = None) -> "LlamaGenPipeline":
        """Decode and verify through ``torch.compile`` (CUDA graphs on CUDA): the fast baseline of
        LlamaGen's ``sample_c2i.py --compile``, and the same speed-up for every speculative mode."""
        self._compiled = CompiledTarget(self.target, mode=mode)
        self._caches.clear()
        return self

    def _cache(self, batch_size: int, max_seq_len: int, cfg: bool) -> StaticKVCache:
        """An empty cache of this shape, reused across calls."""
        target = self._compiled or self.target
        key = (batch_size, max_seq_len, cfg, self.target.device, self.target.dtype)
        if key not in self._caches:
            self._caches[key] = target.new_cache(batch_size, max_seq_len, cfg=cfg)
        cache = self._caches[key]
        cache.reset()
        return cache

    @classmethod
    def from_official(cls, gpt: str, vq: str, gpt_config: str | dict, vq_config: str | dict, **kwargs) -> "LlamaGenPipeline":
        """Build from official LlamaGen ``.pt`` checkpoints (see :func:`load_official_gpt`).

        ``gpt_config`` / ``vq_config``: a preset name (``"GPT-XL"``, ``"VQ-16"``) or a dict of the
        official ``ModelArgs`` fields; ``kwargs`` go to the constructor (e.g. ``drafter``).
        """
        from .official import load_official_gpt, load_official_vq

        return cls(target=load_official_gpt(gpt, gpt_config), vq=load_official_vq(vq, vq_config), **kwargs)

    def _condition(self, class_labels, prompt_embeds, prompt_attention_mask) -> LlamaGenCondition:
        device = self.target.device
        if class_labels is not None:
            if self.target.config.model_type != "c2i":
                raise ValueError("this is a text-conditional (t2i) model: pass prompt_embeds, not class_labels")
            labels = check_class_labels(class_labels, self.target.config.num_classes)
            return LlamaGenCondition(class_labels=labels.to(device))
        if prompt_embeds is None:
            raise ValueError("pass class_labels (c2i models) or prompt_embeds (t2i models)")
        if self.target.config.model_type != "t2i":
            raise ValueError("this is a class-conditional (c2i) model: pass class_labels, not prompt_embeds")
        mask = None if prompt_attention_mask is None else prompt_attention_mask.to(device)
        return LlamaGenCondition(caption_embs=prompt_embeds.to(device, self.target.dtype), caption_mask=mask)

    def _postprocess(self, images: torch.Tensor, output_type: str):
        images = ((images.float() + 1) / 2).clamp(0, 1)
        if output_type == "pt":
            return images
        array = images.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return array
        if output_type == "pil":
            return [PIL.Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
        raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,  # [B, L, caption_dim], left padded (t2i)
        prompt_attention_mask: torch.Tensor | None = None,  # [B, L]
        guidance_scale: float = 4.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        speculative: str | None = None,
        num_draft_tokens: int = 8,
        acceptance: str | AcceptanceRule = "exact",
        acceptance_options: dict | None = None,
        speculative_options: SpeculativeOptions = SpeculativeOptions(),
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[["LlamaGenPipeline", int, None, dict], dict] | None = None,
    ):
        """Generate images.

        Args:
            class_labels: class ids (c2i). prompt_embeds / prompt_attention_mask: text features (t2i).
            guidance_scale: classifier-free guidance; > 1 runs the ``[cond ; uncond]`` pair.
            temperature, top_k, top_p: sampling (temperature 0 or top_k 1 = greedy). LlamaGen's
                sample scripts use top_k=2000 with its 16384-code tokenizers.
            generator: seeds every draw; on CPU the baseline reproduces the official ``generate()``
                under ``torch.manual_seed`` with the same seed.
            speculative: None (baseline) or a key of :data:`SPECULATIVE_METHODS` (``"sjd"``,
                ``"draft-model"``, ...). num_draft_tokens: drafts per step (SJD: window size).
            acceptance: rule name or instance (``"exact"``, ``"greedy"``, ``"lantern"``, ``"gsd"``, ...).
            acceptance_options: keyword options of a rule given by name (e.g. ``{"delta": 0.1}``).
            speculative_options: method knobs (:class:`SpeculativeOptions`).
            output_type: ``"pil"``, ``"np"`` or ``"pt"``. return_dict: output object or tuple.
            callback_on_step_end: ``f(pipe, step, None, {"num_generated": [B], "tokens": [B, N]})`` after
                every verify step (diffusers convention; the timestep slot is None for AR models;
                ``tokens`` is the raster-order grid so far, -1 where not generated yet).

        Returns:
            :class:`LlamaGenPipelineOutput` or ``(images, tokens, stats)``.
        """
        check_llamagen_call(self, class_labels, speculative=None if speculative in GRID_METHODS else speculative,
                            num_draft_tokens=num_draft_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            guidance_scale=guidance_scale)
        condition = self._condition(class_labels, prompt_embeds, prompt_attention_mask)
        if speculative in GRID_METHODS:
            sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, guidance_scale=guidance_scale)
            tokens, stats = GRID_METHODS[speculative](self, condition, sampling, generator, acceptance, acceptance_options)
            images = self._postprocess(self.vq.decode_code(tokens), output_type)
            return LlamaGenPipelineOutput(images=images, tokens=tokens, stats=stats) if return_dict else (images, tokens, stats)
        if isinstance(acceptance, str):
            acceptance = self.acceptance_rule(acceptance, **(acceptance_options or {}))
        elif acceptance_options:
            raise ValueError("acceptance_options apply to a rule given by name, not to a rule instance")
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, guidance_scale=guidance_scale)
        drafter = None
        if speculative is not None:
            if speculative not in SPECULATIVE_METHODS:
                raise ValueError(f"unknown speculative method {speculative!r}; "
                                 f"available: {sorted([*SPECULATIVE_METHODS, *GRID_METHODS])}")
            drafter = SPECULATIVE_METHODS[speculative](self, speculative_options)
        num_tokens = self.target.config.block_size
        window = 1 if drafter is None else drafter.verify_width(num_draft_tokens)  # tokens per verify forward
        cache = self._cache(
            condition.batch_size, required_cache_len(self.target.config.cls_token_num, num_tokens, window),
            sampling.uses_cfg,
        )
        progress = self.progress_bar(total=num_tokens)
        done = [0]  # the bar counts every token (the first comes from the prefill), so it ends at its total

        def on_step(step: int, num_generated: torch.Tensor, ctx) -> None:
            now = int(num_generated.clamp(max=num_tokens).min())  # deliberate sync: progress display
            progress.update(now - done[0])
            done[0] = now
            if callback_on_step_end is not None:
                # Image models have no token prompt: the history is the raster-order token grid so
                # far (-1 where not generated yet).
                tokens = ctx.history[:, :num_tokens]
                callback_on_step_end(self, step, None, {"num_generated": num_generated, "tokens": tokens})

        out = speculative_generate(
            self._compiled or self.target, condition, cache, max_new_tokens=num_tokens, drafter=drafter, acceptance=acceptance,
            num_draft_tokens=num_draft_tokens, sampling=sampling, generator=generator, callback=on_step,
        )
        progress.update(num_tokens - done[0])
        progress.close()
        grid = self.target.grid_size
        tokens = out.tokens.reshape(-1, grid, grid)
        images = self._postprocess(self.vq.decode_code(tokens), output_type)
        if not return_dict:
            return images, tokens, out.stats
        return LlamaGenPipelineOutput(images=images, tokens=tokens, stats=out.stats)
