"""``mmspec bench --suite mar``: MAR baseline at ``num_iter`` and at ``num_iter / gamma`` vs CSpD
(exact, and the reference code's lossy tempered test), same class labels, orders and seed.

Why the second baseline: CSpD's target predicts the tokens of ``gamma`` AR steps in one forward from
the state at the previous verification, which resembles MAR with fewer AR steps; an honest
comparison includes that cheaper baseline (arXiv 2411.11925 does not).
"""

from __future__ import annotations

import torch

from ..loops import GenerationOutput
from ..pipelines.mar.modeling_mar import MARModel, mar_schedule
from ..pipelines.mar.modeling_vae import MARAutoencoderKL
from ..pipelines.mar.official import MAR_PRESETS
from ..pipelines.mar.pipeline_mar import MARPipeline
from ..pipelines.validation import check_int
from .bench import BenchCase, BenchSuite, register_suite, require_folder
from .defaults import default_mar_path, load_default_mar

#: Small random MARs for CPU runs: 128 px -> 8x8 = 64 tokens of 16 channels, 10-step heads.
_SMALL = {
    "img_size": 128,
    "vae_stride": 16,
    "patch_size": 1,
    "vae_embed_dim": 16,
    "class_num": 10,
    "buffer_size": 4,
    "num_sampling_steps": "10",
    "mlp_ratio": 4.0,
}
SMALL_CONFIGS = {
    "random-small": {
        **_SMALL,
        "encoder_embed_dim": 128,
        "encoder_depth": 3,
        "encoder_num_heads": 4,
        "decoder_embed_dim": 128,
        "decoder_depth": 3,
        "decoder_num_heads": 4,
        "diffloss_d": 3,
        "diffloss_w": 256,
    },
    "random-tiny": {
        **_SMALL,
        "encoder_embed_dim": 64,
        "encoder_depth": 1,
        "encoder_num_heads": 4,
        "decoder_embed_dim": 64,
        "decoder_depth": 1,
        "decoder_num_heads": 4,
        "diffloss_d": 2,
        "diffloss_w": 128,
    },
}


def _check_source(setting: str, source: str) -> None:
    """A ``target`` / ``drafter`` setting that is not a preset must be a saved folder (before loading)."""
    if source not in SMALL_CONFIGS and not source.startswith("random:"):
        require_folder(setting, source)


def _model(source: str, seed: int) -> MARModel:
    """``"random-small"`` / ``"random-tiny"`` (CPU-sized) or ``"random:MAR-B|L|H"`` (official sizes,
    random weights: per-step costs only), or a saved ``MARModel`` folder. (The suite's default,
    ``"embedded"``, is the trained reference pair and is loaded whole, VAE included.)"""
    if source in SMALL_CONFIGS:
        fields = SMALL_CONFIGS[source]
    elif source.startswith("random:"):
        preset = source.split(":", 1)[1]
        if preset not in MAR_PRESETS:
            raise ValueError(f"unknown MAR preset {preset!r}; available: {sorted(MAR_PRESETS)}")
        fields = MAR_PRESETS[preset]
    else:
        return MARModel.from_pretrained(source)
    torch.manual_seed(seed)
    return MARModel(**fields)


@register_suite("mar")
def mar_suite(
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 1,
    *,
    target: str = "embedded",
    drafter: str | None = None,
    num_iter: int = 16,
    gamma: int = 4,
    guidance_scale: float = 3.0,
    cfg_schedule: str = "linear",
    temperature: float = 1.0,
    prefill_steps: int | None = None,
    lam: float = 42.0,
) -> BenchSuite:
    """MAR class-to-image: baseline at num_iter and num_iter/gamma, CSpD exact and tempered (lossy)."""
    # Settings wrong for any model fail before one loads; the rest (cfg_schedule, CSpD's options, lam)
    # are checked as the pipeline checks them once it has loaded, before the first case runs.
    check_int("num_iter", num_iter, 1)
    check_int("gamma", gamma, 1)
    if num_iter % gamma:
        raise ValueError(f"num_iter ({num_iter}) must be a multiple of gamma ({gamma}) for the num_iter/gamma baseline")
    if target != "embedded":
        _check_source("target", target)
    if drafter is not None:
        _check_source("drafter", drafter)
    if target == "embedded":  # the trained reference pair with its own VAE
        if drafter is not None:
            raise ValueError("target=embedded is the trained pair (its own drafter): leave drafter unset")
        pipe = load_default_mar(device)
    else:  # drafter None: the tiny random MAR
        target_model, draft_model = _model(target, 0), _model(drafter or "random-tiny", 1)
        levels = target_model.config.vae_stride.bit_length()  # log2(stride) + 1 resolution levels
        vae = MARAutoencoderKL(embed_dim=target_model.config.vae_embed_dim, ch=32, ch_mult=(1,) * (levels - 1) + (2,))
        pipe = MARPipeline(target=target_model, vae=vae, drafter=draft_model).to(device)
    for model in (pipe.target, pipe.drafter):
        torch.nn.Module.to(model, dtype)  # torch's: ModelMixin.to warns on every dtype cast
    pipe.set_progress_bar_config(disable=True)
    labels = [i % pipe.target.config.class_num for i in range(batch_size)]
    speculative_options = {"prefill_steps": prefill_steps}
    mar_schedule(num_iter, pipe.target.seq_len, guidance_scale, cfg_schedule)

    def case(name: str, steps: int, method: str | None, acceptance: str | None = None, options: dict | None = None):
        def run(generator: torch.Generator, profile: bool, part: int) -> GenerationOutput:
            # the whole input is one call: the suite has one part, ``part`` is 0
            orders = torch.stack(
                [
                    torch.randperm(pipe.target.seq_len, generator=torch.Generator().manual_seed(i))
                    for i in range(batch_size)
                ]
            )
            out = pipe(
                class_labels=labels,
                num_iter=steps,
                guidance_scale=guidance_scale,
                cfg_schedule=cfg_schedule,
                temperature=temperature,
                orders=orders,
                generator=generator,
                speculative=method,
                num_draft_tokens=gamma,
                acceptance=acceptance,
                acceptance_options=options,
                speculative_options=speculative_options if method else None,
                output_type="pt",
                profile=profile,
            )
            # [B, seq_len, -1]: the bench compares rows[:seq_len] (all of each row) and counts seq_len tokens
            tokens = out.latents.reshape(batch_size, pipe.target.seq_len, -1)
            return GenerationOutput(
                tokens=tokens, lengths=torch.full((batch_size,), pipe.target.seq_len), stats=out.stats
            )

        return BenchCase(
            name,
            run,
            {
                "num_iter": steps,
                "speculative": method,
                "acceptance": acceptance,
                "acceptance_options": options,
                "gamma": gamma if method else None,
            },
        )

    cases = [
        case(f"baseline num_iter={num_iter}", num_iter, None),
        case(f"baseline num_iter={num_iter // gamma}", num_iter // gamma, None),
        case(f"cspd gamma={gamma} gaussian-exact", num_iter, "cspd"),
        case(
            f"cspd gamma={gamma} gaussian-tempered lam={lam:g} (lossy)",
            num_iter,
            "cspd",
            "gaussian-tempered",
            {"lam": lam},
        ),
    ]
    for c in cases:
        if c.config["speculative"] is not None:
            pipe.resolve_speculation(
                c.config["speculative"], speculative_options, c.config["acceptance"], c.config["acceptance_options"]
            )
    tcfg, dcfg = pipe.target.config, pipe.drafter.config
    return BenchSuite(
        name="mar",
        description=mar_suite.__doc__.split("\n")[0],
        cases=cases,
        setup={
            "model": f"the embedded MAR pair ({default_mar_path()})"
            if target == "embedded"
            else f"MAR {target} with draft MAR {drafter or 'random-tiny'}",
            "target": target,
            "drafter": drafter or ("embedded" if target == "embedded" else "random-tiny"),
            "target_width": tcfg.encoder_embed_dim,
            "target_depth": tcfg.encoder_depth + tcfg.decoder_depth,
            "draft_width": dcfg.encoder_embed_dim,
            "draft_depth": dcfg.encoder_depth + dcfg.decoder_depth,
            "tokens_per_image": pipe.target.seq_len,
            "dtype": str(dtype),
            "batch_size": batch_size,
            "num_iter": num_iter,
            "gamma": gamma,
            "guidance_scale": guidance_scale,
            "cfg_schedule": cfg_schedule,
            "temperature": temperature,
            "prefill_steps": prefill_steps,
            "note": "the trained emoji pair (mmspec/assets/mar-emoji)"
            if target == "embedded"
            else "random weights: acceptance rates say nothing about trained pairs",
        },
    )
