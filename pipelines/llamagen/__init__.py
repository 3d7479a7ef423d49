"""LlamaGen (Sun et al. 2024, arXiv 2406.06525): class/text-conditional GPT over VQ image tokens,
the VQ tokenizer, and loaders for the official checkpoints."""

from .modeling_eagle import LlamaGenEagleHead
from .modeling_gpt import LlamaGenCondition, LlamaGenGPT, llamagen_freqs_2d
from .modeling_upsampler import LlamaGenTokenUpsampler
from .modeling_vq import LlamaGenVQ
from .official import (
    GPT_PRESETS,
    VQ_PRESETS,
    infer_gpt_config,
    infer_vq_config,
    load_official_gpt,
    load_official_vq,
    read_official_state_dict,
    resolve_gpt_config,
    resolve_vq_config,
)
from .pipeline_llamagen import LLAMAGEN_METHODS, LlamaGenPipeline, LlamaGenPipelineOutput

__all__ = [
    "GPT_PRESETS",
    "LLAMAGEN_METHODS",
    "VQ_PRESETS",
    "LlamaGenCondition",
    "LlamaGenEagleHead",
    "LlamaGenGPT",
    "LlamaGenPipeline",
    "LlamaGenPipelineOutput",
    "LlamaGenTokenUpsampler",
    "LlamaGenVQ",
    "infer_gpt_config",
    "infer_vq_config",
    "llamagen_freqs_2d",
    "load_official_gpt",
    "load_official_vq",
    "read_official_state_dict",
    "resolve_gpt_config",
    "resolve_vq_config",
]
