"""``VideoPipeline``: class-conditional block-autoregressive video generation (CausVid-style: each
block of latent frames is denoised in a few flow-matching steps given the KV cache of the earlier
clean blocks) with SDVG (arXiv 2604.17397) as a speculative method on mmspec's block loop.

Modes, one pipeline: ``speculative=None`` (target only), ``"sdvg"`` (a small video model drafts
each block; the block is VAE-decoded, every frame scored by the ``scorer`` component, and the
``"score-threshold"`` router keeps it when the aggregate — worst frame by default — is ``>= tau``;
otherwise the target regenerates it; the first block is always the target's) and ``"draft-only"``
(the drafter generates every block after the target's forced ones).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from mmspec.acceptance import AcceptanceRule
from mmspec.loops import block_generate, fork_generator
from mmspec.methods import MethodRegistry
from mmspec.stats import SOURCE_ACCEPTED, BlockStats

from ..base import SpeculativePipelineMixin
from ..validation import check_non_negative
from .modeling_vae import FrameAutoencoderKL
from .modeling_video import BlockCausalVideoTransformer

#: What must agree between a draft and its target video model (same latents, blocks and classes).
PAIR_FIELDS = ("latent_channels", "latent_size", "frames_per_block", "num_classes", "max_frames")


@dataclass
class VideoPipelineOutput(BaseOutput):
    """``frames``: ``np.ndarray [B, F, H, W, 3]`` in [0, 1] (``"np"``), ``torch.Tensor
    [B, F, 3, H, W]`` in [0, 1] (``"pt"``) or a list of ``B`` lists of ``F`` PIL images (``"pil"``);
    ``latents``: ``[B, F, C, h, w]`` the generated latent frames; ``stats``:
    :class:`~mmspec.stats.BlockStats` (one element per block: score, source, time split)."""

    frames: Any
    latents: torch.Tensor
    stats: BlockStats


#: The video pipeline's speculative methods; the CLI, bench, demos and docs list them from here.
VIDEO_METHODS = MethodRegistry("VideoPipeline")


@VIDEO_METHODS.register(
    "sdvg",
    loop="block",
    default_rule="score-threshold",
    requires=("drafter", "scorer"),
    lossless=False,
    options={"forced_target_blocks": 1, "draft_steps": None},
)
def _sdvg(pipe: VideoPipeline, options: dict) -> BlockCausalVideoTransformer:
    """SDVG: the draft video model proposes each block; kept when its worst frame's score clears tau, else the target regenerates it.

    Rule options (``acceptance_options``): ``tau`` (required; ``calibrate_tau`` picks one from the
    target's own blocks), ``aggregate`` (``min`` / ``mean`` / ``quantile``), ``quantile``. Method
    options: ``forced_target_blocks`` (leading blocks always the target's, SDVG: 1) and
    ``draft_steps`` (the drafter's denoising steps; None = the call's ``num_inference_steps``).
    """
    if pipe.scorer is None:
        raise ValueError(
            "speculative='sdvg' needs a frame scorer: pass scorer= to the pipeline or call pipe.set_scorer("
            "get_frame_scorer(name, ...)) (mmspec.pipelines.video.scorers)"
        )
    return _checked_drafter(pipe, options)


@VIDEO_METHODS.register(
    "draft-only",
    loop="block",
    default_rule="score-threshold",
    requires=("drafter",),
    lossless=False,
    options={"forced_target_blocks": 1, "draft_steps": None},
)
def _draft_only(pipe: VideoPipeline, options: dict) -> BlockCausalVideoTransformer:
    """Draft only: the drafter generates every block after the target's forced ones (SDVG with every block kept, without scoring).

    It equals ``"sdvg"`` at ``tau = -inf`` block for block (same streams); the rule is that
    keep-everything router, fixed. With ``forced_target_blocks=0`` the drafter generates the whole
    video (the quality floor SDVG is compared with).
    """
    return _checked_drafter(pipe, options)


def _checked_drafter(pipe: VideoPipeline, options: dict) -> BlockCausalVideoTransformer:
    if not isinstance(pipe.drafter, BlockCausalVideoTransformer):
        raise ValueError("this method needs a draft BlockCausalVideoTransformer as the pipeline's `drafter` component")
    forced = options["forced_target_blocks"]
    if isinstance(forced, bool) or not isinstance(forced, int) or forced < 0:
        raise ValueError(f"forced_target_blocks must be an integer >= 0, got {forced!r}")
    steps = options["draft_steps"]
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"draft_steps must be None or an integer >= 1, got {steps!r}")
    return pipe.drafter


def check_pair(target: BlockCausalVideoTransformer, drafter: BlockCausalVideoTransformer) -> None:
    """A draft video model must generate the target's blocks in the target's latent space."""
    for name in PAIR_FIELDS:
        a, b = target.config[name], drafter.config[name]
        if a != b:
            raise ValueError(
                f"the draft video model's {name} is {b}, the target's {a}: draft and target must share the "
                "VAE latents, the block size, the classes and the video length"
            )


def flow_timesteps(num_inference_steps: int) -> list[float]:
    """The few-step schedule ``t_k = 1 - k / n`` (``k < n``) of the re-noising sampler."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    return [1.0 - k / num_inference_steps for k in range(num_inference_steps)]


class VideoBlockModel:
    """One generation's state of a video model as a :class:`~mmspec.types.BlockModel`.

    ``generate_block``: the few-step sampler of CausVid / DMD (arXiv 2412.07772): from pure noise,
    at each ``t_k`` predict the clean block ``x0 = x_t - t_k v`` given the cache, then re-noise it to
    ``t_{k+1}`` with fresh noise, ``x = (1 - t_{k+1}) x0 + t_{k+1} eps``; the last ``x0`` is the block.
    Under CFG (``guidance_scale != 1``) the cache holds ``[cond ; null class]`` rows and the
    velocities are combined as ``v_null + s (v_cond - v_null)``. ``write_block``: one forward of the
    clean block at ``t = 0`` appends its keys/values (rolling the cache back to the block's start
    first, so a block index is never written twice).
    """

    def __init__(
        self,
        model: BlockCausalVideoTransformer,
        class_labels: torch.Tensor,  # [B]
        timesteps: list[float],
        guidance_scale: float,
        on_forward: Callable[[], None] | None = None,
    ) -> None:
        self.model, self.timesteps, self.guidance_scale = model, timesteps, guidance_scale
        self.cfg = guidance_scale != 1.0
        labels = class_labels.to(model.device)
        self.labels = torch.cat([labels, torch.full_like(labels, model.config.num_classes)]) if self.cfg else labels
        self.batch = labels.shape[0]
        self.cache = model.new_cache(self.labels.shape[0])
        self.on_forward = on_forward

    def _forward(self, x: torch.Tensor, t: float, index: int, write: bool) -> torch.Tensor:
        model = self.model
        if self.on_forward is not None:
            self.on_forward()
        rows = torch.cat([x, x]) if self.cfg else x
        timestep = torch.full((rows.shape[0],), t, device=model.device)
        v = model(rows, timestep, self.labels, index * model.config.frames_per_block, self.cache, write=write)
        if not self.cfg:
            return v
        v_cond, v_null = v.chunk(2)
        return v_null + self.guidance_scale * (v_cond - v_null)

    def prefill(self, condition: Any) -> None:
        self.model.prefill(self.labels, self.cache)

    def generate_block(self, index: int, generator: torch.Generator | None) -> torch.Tensor:
        model = self.model
        shape = (self.batch, model.config.frames_per_block, *model.latent_shape)
        device = generator.device if generator is not None else torch.device("cpu")
        x = torch.randn(shape, generator=generator, device=device).to(model.device, model.dtype)
        for k, t in enumerate(self.timesteps):
            x0 = x - t * self._forward(x, t, index, write=False)
            if k + 1 < len(self.timesteps):
                t_next = self.timesteps[k + 1]
                noise = torch.randn(shape, generator=generator, device=device).to(model.device, model.dtype)
                x = (1.0 - t_next) * x0 + t_next * noise
        return x0[:, None]  # [B, 1, F, C, h, w]

    def write_block(self, index: int, block: torch.Tensor) -> None:  # block [B, 1, F, C, h, w]
        self.cache.truncate(1 + index * self.model.tokens_per_block)
        self._forward(block[:, 0], 0.0, index, write=True)


class DraftAfterTarget:
    """The draft-only mode as one :class:`~mmspec.types.BlockModel`: blocks ``< forced`` come from
    the target (the generator's stream, as in every mode), the rest from the drafter (its own stream,
    forked from the generator exactly as the block loop forks it), so it equals SDVG at
    ``tau = -inf``. The target caches only the blocks it still needs."""

    def __init__(
        self, target: VideoBlockModel, drafter: VideoBlockModel, forced: int, generator: torch.Generator | None
    ):
        self.target, self.drafter, self.forced = target, drafter, forced
        self.draft_generator = fork_generator(generator)
        self.draft_time = 0.0

    def prefill(self, condition: Any) -> None:
        self.drafter.prefill(condition)
        if self.forced:
            self.target.prefill(condition)

    def generate_block(self, index: int, generator: torch.Generator | None) -> torch.Tensor:
        if index < self.forced:
            return self.target.generate_block(index, generator)
        start = time.perf_counter()
        block = self.drafter.generate_block(index, self.draft_generator)
        self.draft_time += time.perf_counter() - start
        return block

    def write_block(self, index: int, block: torch.Tensor) -> None:
        if index < self.forced - 1:
            self.target.write_block(index, block)
        self.drafter.write_block(index, block)


class VideoPipeline(SpeculativePipelineMixin, DiffusionPipeline):
    """Block-autoregressive video with speculative blocks. Components: ``target``
    (:class:`BlockCausalVideoTransformer`), ``vae`` (:class:`FrameAutoencoderKL`, shared by draft and
    target) and, optional, ``drafter`` (a smaller :class:`BlockCausalVideoTransformer` on the same
    latents) and ``scorer`` (a :class:`~mmspec.pipelines.video.scorers.FrameScorer`, SDVG's router
    input; not written by ``save_pretrained``: scorers load from their own weights)."""

    model_cpu_offload_seq = "target->vae"
    _optional_components = ["drafter", "scorer"]
    methods = VIDEO_METHODS

    def __init__(
        self,
        target: BlockCausalVideoTransformer,
        vae: FrameAutoencoderKL,
        drafter: BlockCausalVideoTransformer | None = None,
        scorer: torch.nn.Module | None = None,
    ) -> None:
        super().__init__()
        if tuple(target.latent_shape) != tuple(vae.latent_shape):
            raise ValueError(
                f"the video model works on latents {tuple(target.latent_shape)}, the VAE makes "
                f"{tuple(vae.latent_shape)}: use the VAE the model was trained with"
            )
        if drafter is not None:
            check_pair(target, drafter)
        if scorer is not None and not callable(getattr(scorer, "score", None)):
            raise ValueError(
                f"scorer must be a FrameScorer (score(prompts, frames [B, F, 3, H, W]) -> [B, F]), got {type(scorer).__name__}"
            )
        self.register_modules(target=target, vae=vae, drafter=drafter, scorer=scorer)

    @property
    def class_names(self) -> list[str]:
        """Caption text of each class (prompts name one; scorers read them)."""
        names = self.target.config.class_names
        return list(names) if names is not None else [f"class {i}" for i in range(self.target.config.num_classes)]

    def set_scorer(self, scorer: torch.nn.Module | None) -> None:
        """Register (or remove, ``None``) the frame scorer SDVG routes on."""
        if scorer is not None and not callable(getattr(scorer, "score", None)):
            raise ValueError(f"scorer must be a FrameScorer, got {type(scorer).__name__}")
        self.register_modules(scorer=scorer)

    # ------------------------------------------------------------------------------ inputs
    def class_labels_for(self, prompt: str | list[str] | None, class_labels) -> torch.Tensor:
        """``[B]`` class ids from ``class_labels`` or from prompts naming classes (case-insensitive)."""
        num = self.target.config.num_classes
        if (prompt is None) == (class_labels is None):
            raise ValueError("give either prompt (class names) or class_labels")
        if prompt is not None:
            names = {name.lower(): i for i, name in enumerate(self.class_names)}
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            unknown = [p for p in prompts if not isinstance(p, str) or p.strip().lower() not in names]
            if unknown:
                raise ValueError(f"prompts {unknown} name no class of this model; its classes: {self.class_names}")
            return torch.tensor([names[p.strip().lower()] for p in prompts], dtype=torch.long)
        labels = torch.as_tensor([class_labels] if isinstance(class_labels, int) else class_labels, dtype=torch.long)
        if labels.dim() != 1 or labels.numel() == 0:
            raise ValueError(f"class_labels must be an int or a non-empty 1-D list, got shape {tuple(labels.shape)}")
        bad = [int(x) for x in labels if not 0 <= int(x) < num]
        if bad:
            raise ValueError(f"class labels {bad} are outside [0, {num})")
        return labels

    def num_blocks_for(self, num_frames: int | None) -> int:
        """Blocks of ``num_frames`` latent frames (None: the model's longest video)."""
        config = self.target.config
        frames = config.max_frames if num_frames is None else num_frames
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"num_frames must be an integer >= 1, got {num_frames!r}")
        if frames % config.frames_per_block:
            raise ValueError(
                f"num_frames {frames} is not a whole number of blocks: the model generates "
                f"{config.frames_per_block} frames per block (use a multiple of {config.frames_per_block})"
            )
        if frames > config.max_frames:
            raise ValueError(f"num_frames {frames} exceeds the model's max_frames {config.max_frames}")
        return frames // config.frames_per_block

    # ------------------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        class_labels: int | list[int] | torch.Tensor | None = None,
        num_frames: int | None = None,
        num_inference_steps: int = 4,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        speculative: str | None = None,
        acceptance: str | AcceptanceRule | None = None,
        acceptance_options: dict | None = None,
        speculative_options: dict | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable[[VideoPipeline, int, None, dict], dict] | None = None,
    ):
        """Generate videos.

        Args:
            prompt: class names (one per video; see :attr:`class_names`), or
            class_labels: class ids (exactly one of the two).
            num_frames: latent frames per video, a multiple of the model's ``frames_per_block``
                (None: ``max_frames``).
            num_inference_steps: denoising steps per block (the few-step re-noising sampler).
            guidance_scale: classifier-free guidance (!= 1 runs ``[cond ; null class]`` rows).
            generator: the target's stream (every noise it draws); drafters fork their own from it.
            speculative: None (target only), ``"sdvg"`` or ``"draft-only"`` (:data:`VIDEO_METHODS`).
            acceptance / acceptance_options: SDVG's block router (default ``"score-threshold"``;
                options ``tau`` (required), ``aggregate``, ``quantile``). Not taken by draft-only.
            speculative_options: ``forced_target_blocks`` (default 1), ``draft_steps``.
            output_type: ``"np"``, ``"pil"`` or ``"pt"``; return_dict: output object or tuple.
            callback_on_step_end: ``f(pipe, step, None, {"num_generated": [B], "latents": [B, F_so_far, C, h, w]})``
                after every block (``step``: blocks done, 1..; ``num_generated``: frames so far).

        Returns:
            :class:`VideoPipelineOutput` or ``(frames, latents, stats)``.
        """
        if output_type not in ("np", "pil", "pt"):
            raise ValueError(f"output_type must be one of 'np', 'pil', 'pt', got {output_type!r}")
        check_non_negative("guidance_scale", guidance_scale)
        labels = self.class_labels_for(prompt, class_labels)
        num_blocks = self.num_blocks_for(num_frames)
        timesteps = flow_timesteps(num_inference_steps)
        draft_only = speculative == "draft-only"
        if draft_only and (acceptance is not None or acceptance_options):
            raise ValueError("draft-only keeps every block: it takes no acceptance rule or options")
        spec = self.resolve_speculation(
            speculative,
            speculative_options,
            acceptance,
            {"tau": float("-inf")} if draft_only else acceptance_options,
        )
        forced = spec.options.get("forced_target_blocks", 0)
        forwards = {"target": 0, "draft": 0}

        def counter(name: str) -> Callable[[], None]:
            def tick() -> None:
                forwards[name] += 1

            return tick

        target = VideoBlockModel(self.target, labels, timesteps, guidance_scale, counter("target"))
        drafter = None
        if spec.drafter is not None:
            steps = spec.options["draft_steps"]
            draft_timesteps = timesteps if steps is None else flow_timesteps(steps)
            drafter = VideoBlockModel(spec.drafter, labels, draft_timesteps, guidance_scale, counter("draft"))
        prompts = [self.class_names[int(i)] for i in labels]
        decode_time = [0.0]

        def score_block(block: torch.Tensor, condition: Any) -> torch.Tensor:  # [B, 1, F, C, h, w] -> [B, F]
            start = time.perf_counter()
            frames = self.vae.decode_video(block[:, 0])  # [B, F, 3, H, W] in [0, 1]
            decode_time[0] += time.perf_counter() - start
            return self.scorer.score(prompts, frames)

        progress = self.progress_bar(total=num_blocks)

        def on_block(index: int, blocks: torch.Tensor) -> None:
            progress.update(1)
            if callback_on_step_end is not None:
                latents = blocks.flatten(1, 2)  # [B, F_so_far, C, h, w]
                generated = torch.full((latents.shape[0],), latents.shape[1], dtype=torch.long)
                callback_on_step_end(self, index + 1, None, {"num_generated": generated, "latents": latents})

        if draft_only:
            model = DraftAfterTarget(target, drafter, forced, generator)
            out = block_generate(model, None, num_blocks=num_blocks, generator=generator, callback=on_block)
            _draft_only_stats(out.stats, forced, model.draft_time)
        else:
            out = block_generate(
                target,
                None,
                num_blocks=num_blocks,
                drafter=drafter,
                router=spec.rule if drafter is not None else None,
                scorer=score_block if drafter is not None else None,
                forced_target_blocks=forced if drafter is not None else 1,
                generator=generator,
                callback=on_block,
            )
        progress.close()
        stats = out.stats
        stats.decode_time = decode_time[0]
        stats.target_forwards, stats.draft_forwards = forwards["target"], forwards["draft"]
        latents = out.blocks.flatten(1, 2)  # [B, F, C, h, w]
        frames = self.decode_latents(latents, output_type)
        if not return_dict:
            return frames, latents, stats
        return VideoPipelineOutput(frames=frames, latents=latents, stats=stats)

    def decode_latents(self, latents: torch.Tensor, output_type: str = "np"):  # [B, F, C, h, w]
        """Frames of latents in ``output_type`` (see :class:`VideoPipelineOutput`)."""
        frames = self.vae.decode_video(latents)  # [B, F, 3, H, W] in [0, 1]
        if output_type == "pt":
            return frames
        array = frames.permute(0, 1, 3, 4, 2).cpu().numpy()
        if output_type == "np":
            return array
        return [[PIL.Image.fromarray((f * 255).round().astype(np.uint8)) for f in video] for video in array]


def _draft_only_stats(stats: BlockStats, forced: int, draft_time: float) -> None:
    """The block loop saw one model (:class:`DraftAfterTarget`): mark the drafter's blocks as kept
    drafts and move their time from the target's column to the drafter's."""
    stats.token_source[:, forced:] = SOURCE_ACCEPTED
    drafted = stats.token_source.shape[1] - min(forced, stats.token_source.shape[1])
    stats.draft_blocks = stats.batch_size * drafted
    stats.target_blocks -= stats.draft_blocks
    stats.row_accepted += drafted
    stats.draft_time, stats.verify_time = draft_time, stats.verify_time - draft_time
