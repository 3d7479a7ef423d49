"""``LlamaGenPipeline``: class- or text-conditional image generation with LlamaGen, with or without
speculative decoding, through mmspec's one draft/verify loop.

``speculative=None`` is the plain autoregressive baseline (static KV cache; the same target,
cache and sampling code as every speculative mode), for A/B comparisons on the same seed.
Speculative methods are looked up in :data:`LLAMAGEN_METHODS` (``LlamaGenPipeline.methods``);
acceptance rules by name in ``mmspec.acceptance`` — both swap without touching a loop.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from mmspec.acceptance import AcceptanceRule
from mmspec.cache import StaticKVCache
from mmspec.compile import CompiledTarget, compile_step
from mmspec.drafters import EagleDrafter, EagleHead, ModelDrafter
from mmspec.drafters.factory import eagle_method, register_jacobi_methods, window_memory, with_window
from mmspec.loops import masked_generate, required_cache_len
from mmspec.methods import MethodRegistry
from mmspec.sampling import SamplingConfig
from mmspec.stats import SpecStats

from ..base import SpeculativePipelineMixin, generate_image_tokens, postprocess_images
from ..validation import check_class_labels, check_llamagen_call
from .modeling_eagle import LlamaGenEagleHead
from .modeling_gpt import LlamaGenCondition, LlamaGenGPT
from .modeling_upsampler import LlamaGenTokenUpsampler
from .modeling_vq import LlamaGenVQ
from .mulo import GridTarget, LowResDrafter, check_pair, make_upsampler
from .text_encoder import encode_prompts


@dataclass
class LlamaGenPipelineOutput(BaseOutput):
    """``images``: list of PIL images, ``np.ndarray [B, H, W, 3]`` or ``torch.Tensor [B, 3, H, W]``
    in [0, 1] (``output_type``); ``tokens``: ``[B, h, w]`` the generated token grid;
    ``stats``: :class:`~mmspec.stats.SpecStats` (``token_source`` / ``token_step`` reshape to the grid)."""

    images: Any
    tokens: torch.Tensor
    stats: SpecStats


#: LlamaGen's speculative methods (``speculative=`` name -> loop, drafter factory, default rule,
#: options); the CLI, bench, eval and demos list them from here.
LLAMAGEN_METHODS = MethodRegistry("LlamaGenPipeline")


register_jacobi_methods(LLAMAGEN_METHODS, lambda pipe: pipe.target.grid_size)


@LLAMAGEN_METHODS.register("draft-model", options={"window": "fixed"}, requires=("drafter",))
def _draft_model(pipe: LlamaGenPipeline, options: dict) -> Any:
    """A smaller LlamaGen GPT with the same codebook (the ``drafter`` component) proposes a chain."""
    if not isinstance(pipe.drafter, LlamaGenGPT):
        raise ValueError("speculative='draft-model' needs a smaller LlamaGenGPT as the pipeline's `drafter` component")
    model = pipe._compiled_step("drafter", pipe.drafter) or pipe.drafter
    return with_window(ModelDrafter(model), options["window"], window_memory(pipe._window_memo, "draft-model", options))


@LLAMAGEN_METHODS.register("eagle", options={"tree": None}, requires=("eagle_head",))
def _eagle(pipe: LlamaGenPipeline, options: dict) -> EagleDrafter:
    """EAGLE feature-level drafting: a chain, or an EAGLE-2 dynamic tree (``tree``: a TreeConfig)."""
    return eagle_method(
        pipe.eagle_head,
        options,
        "`mmspec train-drafter --target-kind llamagen`",
        step=pipe._compiled_step("eagle", pipe.eagle_head),
    )


@LLAMAGEN_METHODS.register(
    "mulo",
    loop="masked",
    default_rule="mulo",
    lossless=False,
    options={"upsampler": "decode-resize-encode", "max_rounds": 4},
    requires=("low_res_drafter",),
)
def _mulo(pipe: LlamaGenPipeline, options: dict) -> Any:
    """MuLo-SD: a low-resolution GPT drafts the whole grid, up-sampled; local repair of rejections."""
    if not isinstance(pipe.low_res_drafter, LlamaGenGPT):
        raise ValueError(
            "speculative='mulo' needs the pipeline's `low_res_drafter` component: a LlamaGenGPT over a "
            "smaller grid with the target's codebook (train one with "
            "`mmspec train-reference --stage low-res-draft`)"
        )
    max_rounds = options["max_rounds"]
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise ValueError(f"max_rounds must be an integer >= 1, got {max_rounds!r}")
    check_pair(pipe.target, pipe.low_res_drafter)
    upsampler = make_upsampler(options["upsampler"], pipe.vq, pipe.upsampler)
    return LowResDrafter(pipe.low_res_drafter, upsampler, pipe.target.grid_size)


#: Default folder for LANTERN neighbour tables (one file per codebook hash and k).
NEIGHBOUR_CACHE = Path(os.environ.get("MMSPEC_CACHE", Path.home() / ".cache" / "mmspec")) / "neighbours"


class LlamaGenPipeline(SpeculativePipelineMixin, DiffusionPipeline):
    """LlamaGen (Sun et al. 2024, arXiv 2406.06525) with speculative decoding.

    Components: ``target`` (:class:`LlamaGenGPT`), ``vq`` (:class:`LlamaGenVQ`) and, optional, two
    drafters: ``drafter`` (a smaller ``LlamaGenGPT`` over the same grid, ``speculative="draft-model"``)
    and ``low_res_drafter`` (a ``LlamaGenGPT`` over a smaller grid of the same codebook,
    ``speculative="mulo"``), plus ``upsampler`` (a :class:`LlamaGenTokenUpsampler` from the
    low-resolution grid to the target's, MuLo-SD's ``upsampler="learned"``), and ``eagle`` (a
    :class:`LlamaGenEagleHead` trained for this target, ``speculative="eagle"``; also attached by
    :meth:`load_eagle_head`). A head for another target is refused (fingerprint of the LM head).
    """

    model_cpu_offload_seq = "target->vq"
    _optional_components = ["drafter", "low_res_drafter", "upsampler", "eagle", "text_encoder", "tokenizer"]
    # The EAGLE head runs inside the drafter, not through its own forward, so model CPU offload's
    # hooks would never bring it to the GPU: it stays on the execution device (it is small).
    _exclude_from_cpu_offload: ClassVar[list[str]] = ["eagle"]

    def __init__(
        self,
        target: LlamaGenGPT,
        vq: LlamaGenVQ,
        drafter: Any = None,
        low_res_drafter: LlamaGenGPT | None = None,
        upsampler: LlamaGenTokenUpsampler | None = None,
        eagle: LlamaGenEagleHead | None = None,
        text_encoder: Any = None,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        if (text_encoder is None) != (tokenizer is None):
            raise ValueError("pass the T5 text_encoder and its tokenizer together (or neither)")
        if text_encoder is not None and target.config.model_type != "t2i":
            raise ValueError("a text encoder serves text-conditional (t2i) models; this one is class-conditional")
        if target.config.vocab_size != vq.config.codebook_size:
            raise ValueError(
                f"target vocabulary ({target.config.vocab_size}) does not match the VQ codebook "
                f"({vq.config.codebook_size}): use the tokenizer the GPT was trained with"
            )
        for name, model in (("drafter", drafter), ("low_res_drafter", low_res_drafter), ("upsampler", upsampler)):
            if (
                model is not None
                and getattr(model.config, "vocab_size", target.config.vocab_size) != target.config.vocab_size
            ):
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
        if eagle is not None:
            eagle.bind(target)
        self.register_modules(
            target=target,
            vq=vq,
            drafter=drafter,
            low_res_drafter=low_res_drafter,
            upsampler=upsampler,
            eagle=eagle,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
        )
        self._rule_memo: dict = {}  # tables rules build from this pipeline's models (LANTERN neighbours per k)
        self._window_memo: dict = {}  # what adaptive draft windows learned (per method, options, batch size)
        self._compiled: CompiledTarget | None = None  # set by enable_compile()
        self._compiled_steps: dict[str, tuple] = {}  # name -> (component, its compiled step), by enable_compile()
        self._caches: dict[tuple, StaticKVCache] = {}  # reused across calls (CUDA graphs need fixed addresses)

    @property
    def eagle_head(self) -> EagleHead | None:
        """The EAGLE head of the ``eagle`` component (sharing the target's embedding and LM head), or None."""
        eagle = getattr(self, "eagle", None)
        return None if eagle is None else eagle.head

    def load_eagle_head(self, path: str | os.PathLike) -> LlamaGenPipeline:
        """Register the EAGLE head saved in ``path`` (``mmspec train-drafter``, or a pipeline's ``eagle``
        subfolder) as the ``eagle`` component, on the target's device and dtype. Returns the pipeline.

        Raises:
            ValueError: the head was trained for another target (checked by a fingerprint of the
                target's LM head).
        """
        eagle = LlamaGenEagleHead.from_pretrained(path).bind(self.target)
        self.register_modules(eagle=eagle.to(device=self.target.device, dtype=self.target.dtype))
        return self

    def load_text_encoder(self, path: str | os.PathLike) -> LlamaGenPipeline:
        """Register the FLAN-T5 encoder of a t2i model and its tokenizer, from a local folder (e.g.
        ``google/flan-t5-xl`` saved with ``save_pretrained``), as the optional ``text_encoder`` /
        ``tokenizer`` components, so that ``prompt=`` works (they move with ``.to()`` and are saved by
        ``save_pretrained``). Returns the pipeline."""
        from .text_encoder import load_t5

        if self.target.config.model_type != "t2i":
            raise ValueError("a text encoder serves text-conditional (t2i) models; this one is class-conditional")
        encoder, tokenizer = load_t5(path, device=self.target.device)
        self.register_modules(text_encoder=encoder, tokenizer=tokenizer)
        return self

    #: The speculative methods this pipeline runs (``speculative=`` names).
    methods = LLAMAGEN_METHODS

    def rule_resources(self) -> dict:
        """What rules that need this pipeline's models are built from (see
        :meth:`mmspec.acceptance.AcceptanceRule.from_resources`): the VQ codebook (LANTERN's latent
        neighbourhoods, GSD), the GPT's token embedding (GSD), the token grid (MuLo-SD) and the
        neighbour-table cache folder."""
        return {
            "codebook": self.vq.codebook_embeddings().detach().float(),  # [V, C] as the decoder sees them
            "codebook_raw": self.vq.quantize.embedding.weight.detach().float(),  # [V, C] as stored
            "codebook_l2_norm": bool(self.vq.quantize.l2_norm),  # the decoder looks up L2-normalised rows
            "token_embeddings": self.target.tok_embeddings.weight.detach().float(),
            "grid": (self.target.grid_size, self.target.grid_size),
            "cache_dir": NEIGHBOUR_CACHE,
            "memo": self._rule_memo,
        }

    def enable_compile(self, mode: str | None = None) -> LlamaGenPipeline:
        """Decode and verify through ``torch.compile`` (CUDA graphs on CUDA): the fast baseline of
        LlamaGen's ``sample_c2i.py --compile``, and the same speed-up for every speculative mode. The
        draft steps are compiled too: the ``drafter`` GPT's forward (``draft-model``) and the EAGLE
        head's (``eagle``), each once per pipeline, so every call reuses their graphs."""
        self._compiled = CompiledTarget(self.target, mode=mode)
        mode = self._compiled.mode
        self._compiled_steps = {}
        if self.drafter is not None:
            self._compiled_steps["drafter"] = (self.drafter, CompiledTarget(self.drafter, mode=mode))
        if self.eagle_head is not None:
            self._compiled_steps["eagle"] = (self.eagle_head, compile_step(self.eagle_head.forward, mode))
        self._caches.clear()
        return self

    def _compiled_step(self, name: str, model: Any) -> Any:
        """The compiled step of component ``name`` (from :meth:`enable_compile`) while that component
        is still ``model``; None when compilation is off or the component was replaced since."""
        compiled_model, step = self._compiled_steps.get(name, (None, None))
        return step if self._compiled is not None and compiled_model is model else None

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
    def from_official(
        cls, gpt: str, vq: str, gpt_config: str | dict, vq_config: str | dict, **kwargs
    ) -> LlamaGenPipeline:
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
        acceptance: str | AcceptanceRule | None = None,
        acceptance_options: dict | None = None,
        speculative_options: dict | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[LlamaGenPipeline, int, None, dict], dict] | None = None,
        prompt: str | list[str] | None = None,
        profile: bool = False,
    ):
        """Generate images.

        Args:
            class_labels: class ids (c2i). prompt_embeds / prompt_attention_mask: text features (t2i).
            prompt: text (t2i), encoded by the T5 encoder attached with :meth:`load_text_encoder`.
            guidance_scale: classifier-free guidance; > 1 runs the ``[cond ; uncond]`` pair.
            temperature, top_k, top_p: sampling (temperature 0 or top_k 1 = greedy). LlamaGen's
                sample scripts use top_k=2000 with its 16384-code tokenizers.
            generator: seeds every draw; on CPU the baseline reproduces the official ``generate()``
                under ``torch.manual_seed`` with the same seed.
            speculative: None (baseline) or a method of :data:`LLAMAGEN_METHODS` (``"sjd"``,
                ``"mc-sjd"``, ``"draft-model"``, ``"eagle"``, ``"mulo"``). num_draft_tokens: drafts per step (SJD:
                window size; with ``speculative_options={"window": "heuristic" | "cost"}`` the maximum width).
            acceptance: rule name or instance (``"exact"``, ``"greedy"``, ``"lantern"``, ``"gsd"``, ...);
                None = the method's default rule (``"exact"``; MuLo-SD: ``"mulo"``).
            acceptance_options: keyword options of a rule given by name (e.g. ``{"delta": 0.1}``).
            speculative_options: the method's options (``LLAMAGEN_METHODS.get(name).options``: SJD
                ``init`` / ``coupling`` / ``window``, EAGLE ``tree``, MuLo-SD ``upsampler`` / ``max_rounds``).
            output_type: ``"pil"``, ``"np"`` or ``"pt"``. return_dict: output object or tuple.
            callback_on_step_end: ``f(pipe, step, None, {"num_generated": [B], "tokens": [B, N]})`` after
                every verify step (diffusers convention; the timestep slot is None for AR models;
                ``tokens`` is the raster-order grid so far, -1 where not generated yet; masked-loop
                methods such as MuLo-SD: after every verify-and-repair round, the whole current grid).
            profile: time the loop's phases (``stats.draft_time`` / ``verify_time`` / ``accept_time``,
                in the causal and the masked loop alike), synchronising the device around each: for
                breakdowns such as ``mmspec bench``'s, not for speed.

        Returns:
            :class:`LlamaGenPipelineOutput` or ``(images, tokens, stats)``.
        """
        if prompt is not None:
            if prompt_embeds is not None or getattr(self, "text_encoder", None) is None:
                raise ValueError(
                    "prompt= needs a text encoder (pipe.load_text_encoder(t5_folder)) and no prompt_embeds"
                )
            prompt_embeds, prompt_attention_mask = encode_prompts(
                self.text_encoder, self.tokenizer, prompt, self.target.config.cls_token_num
            )
        check_llamagen_call(
            self,
            class_labels,
            speculative=speculative,
            num_draft_tokens=num_draft_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            guidance_scale=guidance_scale,
        )
        condition = self._condition(class_labels, prompt_embeds, prompt_attention_mask)
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, guidance_scale=guidance_scale)
        spec = self.resolve_speculation(speculative, speculative_options, acceptance, acceptance_options)
        drafter, acceptance = spec.drafter, spec.rule
        if spec.method is not None and spec.method.loop == "masked":
            return self._masked(
                condition,
                sampling,
                drafter,
                acceptance,
                spec.options,
                generator,
                output_type,
                return_dict,
                callback_on_step_end,
                profile,
            )
        num_tokens = self.target.config.block_size
        window = 1 if drafter is None else drafter.verify_width(num_draft_tokens)  # tokens per verify forward
        cache = self._cache(
            condition.batch_size,
            required_cache_len(self.target.config.cls_token_num, num_tokens, window),
            sampling.uses_cfg,
        )
        out = generate_image_tokens(
            self,
            self._compiled or self.target,
            condition,
            cache,
            num_tokens,
            spec,
            num_draft_tokens,
            sampling,
            generator,
            callback_on_step_end,
            profile,
        )
        grid = self.target.grid_size
        tokens = out.tokens.reshape(-1, grid, grid)
        images = postprocess_images(self.vq.decode_code(tokens), output_type)
        if not return_dict:
            return images, tokens, out.stats
        return LlamaGenPipelineOutput(images=images, tokens=tokens, stats=out.stats)

    def _masked(
        self,
        condition,
        sampling,
        drafter,
        rule,
        options,
        generator,
        output_type,
        return_dict,
        callback_on_step_end,
        profile,
    ):
        """A masked-loop method (MuLo-SD): the whole grid drafted, verified and repaired locally."""
        grid = GridTarget(self.target, sampling, condition.batch_size)
        progress = self.progress_bar(total=options["max_rounds"])

        def on_round(steps: int, tokens: torch.Tensor) -> None:
            progress.update(1)
            if callback_on_step_end is not None:  # every position holds a token from the first round on
                num_generated = torch.full((tokens.shape[0],), tokens.shape[1], device=tokens.device)
                callback_on_step_end(self, steps, None, {"num_generated": num_generated, "tokens": tokens})

        out = masked_generate(
            grid,
            drafter,
            condition,
            acceptance=rule,
            max_rounds=options["max_rounds"],
            generator=generator,
            callback=on_round,
            profile=profile,
        )
        progress.update(options["max_rounds"] - progress.n)
        progress.close()
        tokens = out.elements.view(-1, self.target.grid_size, self.target.grid_size)
        images = postprocess_images(self.vq.decode_code(tokens), output_type)
        if not return_dict:
            return images, tokens, out.stats
        return LlamaGenPipelineOutput(images=images, tokens=tokens, stats=out.stats)
