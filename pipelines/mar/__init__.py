"""MAR (Li et al. 2024, arXiv 2406.11838): masked autoregressive image generation over continuous
VAE tokens with a per-token diffusion head, its KL-16 VAE, loaders for the official checkpoints,
and CSpD (arXiv 2411.11925) as a masked-loop speculative method."""

from .cspd import MARDrafter, MARVerifyTarget
from .modeling_mar import GaussianDiffusionSchedule, MARModel, mar_schedule
from .modeling_vae import TOKEN_SCALE, MARAutoencoderKL
from .official import (
    MAR_PRESETS,
    VAE_PRESETS,
    infer_vae_config,
    load_official_mar,
    load_official_vae,
    read_official_checkpoint,
    resolve_mar_config,
)
from .pipeline_mar import MAR_METHODS, MARPipeline, MARPipelineOutput
from .sampling import MARPlan

__all__ = [
    "MAR_METHODS",
    "MAR_PRESETS",
    "TOKEN_SCALE",
    "VAE_PRESETS",
    "GaussianDiffusionSchedule",
    "MARAutoencoderKL",
    "MARDrafter",
    "MARModel",
    "MARPipeline",
    "MARPipelineOutput",
    "MARPlan",
    "MARVerifyTarget",
    "infer_vae_config",
    "load_official_mar",
    "load_official_vae",
    "mar_schedule",
    "read_official_checkpoint",
    "resolve_mar_config",
]
