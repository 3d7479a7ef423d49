"""``MARPipeline``: class-conditional image generation with MAR (arXiv 2406.11838), as the plain
masked-autoregressive baseline or with continuous speculative decoding (CSpD, arXiv 2411.11925)
through mmspec's masked loop.

``speculative=None`` reproduces the official ``MAR.sample_tokens`` + ``vae.decode(tokens / vae.config.scaling_factor)`` (0.2325)
(tested against the official fixtures): pass the official generation orders as ``orders=`` (the
official code draws them with numpy's global shuffle) and a generator seeded like the official
``torch.manual_seed``. Speculative methods are looked up in :data:`MAR_METHODS`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from mmspec.acceptance import AcceptanceRule
from mmspec.loops import hand_back, masked_generate, outside_inference_mode
from mmspec.methods import MethodRegistry
from mmspec.stats import SOURCE_PREFILL, SOURCE_RECOVERED, MaskedStats

from ..base import SpeculativePipelineMixin, postprocess_images
from ..validation import check_non_negative
from .cspd import MARDrafter, MARVerifyTarget
from .modeling_mar import MARModel
from .modeling_vae import MARAutoencoderKL
from .sampling import MARPlan, draw_step_noise, predict_tokens


@dataclass
class MARPipelineOutput(BaseOutput):
    """``images``: PIL list, ``np.ndarray [B, H, W, 3]`` or ``torch.Tensor [B, 3, H, W]`` in [0, 1];
    ``latents``: ``[B, vae_embed_dim, h, w]`` the generated tokens, unpatchified (the official
    ``sample_tokens`` output, i.e. VAE latents * ``vae.config.scaling_factor``); ``stats``: :class:`~mmspec.stats.MaskedStats`
    over the ``L`` token positions (``steps`` = target MAE forwards)."""

    images: Any
    latents: torch.Tensor
    stats: MaskedStats


#: MAR's speculative methods; the CLI, bench and docs list them from here.
MAR_METHODS = MethodRegistry("MARPipeline")


@MAR_METHODS.register(
    "cspd",
    loop="masked",
    default_rule="gaussian-exact",
    requires=("drafter",),
    options={"prefill_steps": None, "prefill_fraction": 0.1},
)
def _cspd(pipe: MARPipeline, options: dict) -> Any:
    """CSpD: a draft MAR proposes the next gamma steps' tokens with their Gaussians; exact density-ratio test."""
    if not isinstance(pipe.drafter, MARModel):
        raise ValueError(
            "speculative='cspd' needs a draft MARModel as the pipeline's `drafter` component "
            "(any size, same VAE latents as the target)"
        )
    check_pair(pipe.target, pipe.drafter)
    fraction = options["prefill_fraction"]
    if not 0 <= fraction <= 1:
        raise ValueError(f"prefill_fraction must be in [0, 1], got {fraction}")
    steps = options["prefill_steps"]
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f"prefill_steps must be None or an integer >= 0, got {steps!r}")
    return pipe.drafter  # the per-call MARDrafter is built in __call__ (it needs num_draft_tokens)


def check_pair(target: MARModel, drafter: MARModel) -> None:
    """A draft MAR must work on the target's token grid and latents (same VAE)."""
    for field in ("img_size", "vae_stride", "patch_size", "vae_embed_dim", "class_num"):
        a, b = target.config[field], drafter.config[field]
        if a != b:
            raise ValueError(
                f"the draft MAR's {field} is {b}, the target's {a}: a CSpD draft must share the "
                "target's VAE, token grid and classes"
            )


class MARPipeline(SpeculativePipelineMixin, DiffusionPipeline):
    """MAR with speculative decoding. Components: ``target`` (:class:`MARModel`), ``vae``
    (:class:`MARAutoencoderKL`) and, optional, ``drafter`` (a smaller :class:`MARModel` on the same
    latents, ``speculative="cspd"``)."""

    model_cpu_offload_seq = "target->vae"
    _optional_components = ["drafter"]
    methods = MAR_METHODS

    def __init__(self, target: MARModel, vae: MARAutoencoderKL, drafter: MARModel | None = None) -> None:
        super().__init__()
        if target.config.vae_embed_dim != vae.config.embed_dim:
            raise ValueError(
                f"the MAR's vae_embed_dim ({target.config.vae_embed_dim}) does not match the VAE's "
                f"embed_dim ({vae.config.embed_dim}): use the VAE the MAR was trained with"
            )
        if target.config.vae_stride != vae.downsample_factor:
            raise ValueError(
                f"the MAR's vae_stride ({target.config.vae_stride}) does not match the VAE's down-sampling "
                f"factor ({vae.downsample_factor}): use the VAE the MAR was trained with"
            )
        if drafter is not None:
            check_pair(target, drafter)
        self.register_modules(target=target, vae=vae, drafter=drafter)

    def enable_compile(self, mode: str | None = None) -> MARPipeline:
        """Run the MAE pass and the diffusion-head step of the target (and drafter) through
        ``torch.compile`` (``nn.Module.compile``: the modules are compiled in place; their weights
        and state dicts are unchanged). Default mode: ``"reduce-overhead"`` (CUDA graphs) on CUDA,
        ``"default"`` elsewhere. The MAE pass has static shapes per batch size; the head step is
        compiled with a dynamic token count (one graph serves every AR step's count and all ``S``
        diffusion steps, which differ only in the step tensor).

        Not the default on the CPU: on the embedded pair a compiled AR step took 0.24-0.81x the
        eager time, but the one-off compile (86-207 s cold, 9-21 s with inductor's cache) pays off
        only after tens of images (``benchmarks/RESULTS.md``, "MAR reference pair")."""
        mode = mode or ("reduce-overhead" if self.target.device.type == "cuda" else "default")
        for model in (self.target, self.drafter):
            if model is not None:
                model.compile(mode=mode, fullgraph=True, dynamic=False)
                model.diffloss.compile(mode=mode, fullgraph=True, dynamic=True)
        return self

    @classmethod
    def from_official(
        cls,
        mar: str,
        vae: str,
        mar_config: str | dict | None = None,
        vae_config: str | dict | None = None,
        drafter: str | MARModel | None = None,
        drafter_config: str | dict | None = None,
        use_ema: bool = True,
    ) -> MARPipeline:
        """Build from official checkpoints (see :mod:`mmspec.pipelines.mar.official`): ``mar``
        (released ``{"model", "model_ema"}`` or trainer ``checkpoint-last.pth``; EMA weights unless
        ``use_ema=False``), ``vae`` (``kl16.ckpt``; widths read from the shapes unless ``vae_config``);
        ``drafter``: another official MAR checkpoint (or a model) for CSpD."""
        from .official import load_official_mar, load_official_vae

        draft = drafter
        if isinstance(drafter, str):
            draft = load_official_mar(drafter, drafter_config, use_ema=use_ema)
        return cls(
            target=load_official_mar(mar, mar_config, use_ema=use_ema),
            vae=load_official_vae(vae, vae_config),
            drafter=draft,
        )

    # ------------------------------------------------------------------------------ helpers
    def _labels(self, class_labels, batch_size: int | None) -> tuple[torch.Tensor | None, int]:
        if class_labels is None:
            return None, 1 if batch_size is None else batch_size
        labels = torch.as_tensor([class_labels] if isinstance(class_labels, int) else class_labels, dtype=torch.long)
        if labels.dim() != 1:
            raise ValueError(f"class_labels must be an int or a 1-D list, got shape {tuple(labels.shape)}")
        bad = [int(x) for x in labels if not 0 <= int(x) < self.target.config.class_num]
        if bad:
            raise ValueError(f"class labels {bad} are outside [0, {self.target.config.class_num})")
        if batch_size is not None and batch_size != len(labels):
            raise ValueError(f"batch_size {batch_size} does not match {len(labels)} class labels")
        return labels.to(self.target.device), len(labels)

    def _orders(self, orders, batch: int, generator: torch.Generator | None) -> torch.Tensor:
        seq_len = self.target.seq_len
        if orders is None:  # a random permutation per row, from the generator (before any noise)
            device = generator.device if generator is not None else torch.device("cpu")
            return torch.argsort(torch.rand(batch, seq_len, generator=generator, device=device), dim=1).to(
                self.target.device
            )
        orders = torch.as_tensor(np.asarray(orders) if not isinstance(orders, torch.Tensor) else orders).long()
        if orders.shape != (batch, seq_len) or not bool(
            (orders.sort(1).values == torch.arange(seq_len, device=orders.device)).all()
        ):
            raise ValueError(
                f"orders must be a permutation of 0..{seq_len - 1} per row, shape ({batch}, {seq_len}); "
                f"got shape {tuple(orders.shape)}"
            )
        return orders.to(self.target.device)

    # ------------------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor | None = None,
        num_iter: int = 64,
        guidance_scale: float = 1.0,
        cfg_schedule: str = "linear",
        temperature: float = 1.0,
        orders: torch.Tensor | np.ndarray | None = None,  # [B, L]
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
        speculative: str | None = None,
        num_draft_tokens: int = 4,
        acceptance: str | AcceptanceRule | None = None,
        acceptance_options: dict | None = None,
        speculative_options: dict | None = None,
        sample_last_step: bool = False,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[MARPipeline, int, None, dict], dict] | None = None,
        profile: bool = False,
    ):
        """Generate images.

        Args:
            class_labels: class ids; None = unconditional (the learned null class), ``batch_size`` rows.
            num_iter: AR steps (MAR's cosine schedule over the ``L`` tokens).
            guidance_scale, cfg_schedule: classifier-free guidance (!= 1 runs the [cond ; null] pair)
                and its schedule, ``"linear"`` (``1 + (cfg - 1)(L - mask_len_next)/L``) or ``"constant"``.
            temperature: scales the std of every reverse diffusion step but the last (official).
            orders: ``[B, L]`` generation orders (permutations); None draws them from ``generator``.
            generator: every draw (order, the head's noises in the official order, the rule's draws).
            speculative: None (baseline) or a method of :data:`MAR_METHODS` (``"cspd"``).
            num_draft_tokens: CSpD's gamma — AR steps drafted per verification.
            acceptance / acceptance_options: the elementwise rule (default ``"gaussian-exact"``).
            speculative_options: ``prefill_steps`` (AR steps the target runs before drafting; None:
                ``ceil(prefill_fraction * num_iter)``), ``prefill_fraction`` (default 0.1).
            sample_last_step: baseline only — False (official): each token is the last reverse step's
                mean; True: a draw from that step's Gaussian (with the t = 0 noise the official code
                draws and discards), the tokens CSpD commits.
            output_type: ``"pil"``, ``"np"`` or ``"pt"``; return_dict: output object or tuple.
            callback_on_step_end: ``f(pipe, step, None, {"tokens": [B, L, C], "known": [B, L]})`` after
                every AR step (baseline) or verify round (CSpD).
            profile: CSpD only -- time its phases separately (``stats.draft_time`` / ``verify_time`` /
                ``accept_time``, :func:`mmspec.loops.masked_generate`), synchronising the device between
                them; the baseline loop has no phases to split.

        Returns:
            :class:`MARPipelineOutput` or ``(images, latents, stats)``.
        """
        check_non_negative("guidance_scale", guidance_scale)
        check_non_negative("temperature", temperature)
        labels, batch = self._labels(class_labels, batch_size)
        spec = self.resolve_speculation(speculative, speculative_options, acceptance, acceptance_options)
        if spec.method is not None and spec.method.loop != "masked":
            raise ValueError(f"speculative={speculative!r} is not a masked-loop method")
        orders = self._orders(orders, batch, generator)
        cfg = guidance_scale != 1.0
        plan = MARPlan.build(orders, num_iter, guidance_scale, cfg_schedule)
        if spec.method is None:
            tokens, stats = self._baseline(
                plan, labels, cfg, temperature, generator, sample_last_step, callback_on_step_end
            )
        else:
            if sample_last_step:
                raise ValueError("sample_last_step is a baseline option (CSpD always samples the last step)")
            tokens, stats = self._cspd(
                plan, labels, cfg, temperature, generator, spec, num_draft_tokens, callback_on_step_end, profile
            )
        latents = self.target.unpatchify(tokens)
        images = postprocess_images(
            self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor), output_type
        )
        if not return_dict:
            return images, latents, stats
        return MARPipelineOutput(images=images, latents=latents, stats=stats)

    @torch.inference_mode()  # as the loops, so CSpD is compared with an equally fast baseline
    def _baseline(
        self, plan: MARPlan, labels, cfg: bool, temperature: float, generator, sample_last_step: bool, callback
    ) -> tuple[torch.Tensor, MaskedStats]:
        """The official ``sample_tokens`` loop: one MAE forward and one head sampling per AR step. Runs in
        inference mode like :func:`~mmspec.loops.masked_generate`, and like it hands back normal tensors."""
        model = self.target
        batch, seq_len = plan.orders.shape
        device, channels = model.device, model.token_embed_dim
        stats = MaskedStats(batch, seq_len, seq_len, device=device)
        start = time.perf_counter()
        tokens = torch.zeros(batch, seq_len, channels, device=device, dtype=model.dtype)
        unknown = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
        for k in self.progress_bar(range(plan.num_iter)):
            pos = plan.positions[k]  # [B, n]
            init, steps = draw_step_noise(generator, pos.numel(), channels, model.schedule.num_steps, cfg, device)
            out = predict_tokens(
                model, tokens, unknown, labels, cfg, pos, plan.steps[k].cfg, temperature, init, steps, sample_last_step
            )
            tokens.scatter_(1, pos[..., None].expand(*pos.shape, channels), out.tokens.view(*pos.shape, channels))
            unknown.scatter_(1, pos, False)
            stats.record_elements(
                torch.zeros_like(unknown).scatter_(1, pos, True),
                torch.full_like(stats.token_source, SOURCE_RECOVERED),
                k + 1,
            )
            if callback is not None:
                outside_inference_mode(callback, self, k, None, {"tokens": tokens, "known": ~unknown})
        stats.steps = plan.num_iter
        stats.row_steps.fill_(plan.num_iter)
        stats.total_time = time.perf_counter() - start
        (tokens,) = hand_back(stats, tokens)
        return tokens, stats

    def _cspd(
        self,
        plan: MARPlan,
        labels,
        cfg: bool,
        temperature: float,
        generator,
        spec,
        gamma: int,
        callback,
        profile: bool,
    ) -> tuple[torch.Tensor, MaskedStats]:
        """CSpD through :func:`mmspec.loops.masked_generate` (see :mod:`.cspd`)."""
        options = spec.options
        prefill = options["prefill_steps"]
        if prefill is None:
            prefill = int(np.ceil(options["prefill_fraction"] * plan.num_iter))
        prefill = min(prefill, plan.num_iter)
        model = self.target
        plan.draw_noise(generator, model.token_embed_dim, model.schedule.num_steps, cfg, model.device)
        if self.drafter.schedule.num_steps != model.schedule.num_steps:
            raise ValueError(
                f"the draft MAR's head samples {self.drafter.schedule.num_steps} diffusion steps, the "
                f"target's {model.schedule.num_steps}: trajectory alignment needs the same number"
            )
        target = MARVerifyTarget(model, plan, labels, cfg, temperature, prefill_steps=prefill)
        drafter = MARDrafter(self.drafter, gamma)
        progress = self.progress_bar(total=plan.num_iter)

        def on_round(steps: int, tokens: torch.Tensor) -> None:
            progress.update((drafter.next_step or prefill) - progress.n)
            if callback is not None:
                callback(self, steps, None, {"tokens": tokens, "known": target.written.clone()})

        out = masked_generate(
            target,
            drafter,
            None,
            acceptance=spec.rule,
            max_rounds=1,
            generator=generator,
            callback=on_round,
            profile=profile,
        )
        progress.update(plan.num_iter - progress.n)
        progress.close()
        stats = out.stats
        if prefill:  # the tokens the target generated before drafting started
            pre = torch.zeros_like(target.written)
            for k in range(prefill):
                pre.scatter_(1, plan.positions[k], True)
            stats.record_elements(pre, torch.full_like(stats.token_source, SOURCE_PREFILL), plan.step_of + 1)
        return out.elements, stats
