"""Vision-language models (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL via transformers) as mmspec
targets, and :class:`VLMPipeline` for speculative image-to-text generation."""

from .decoder import RopeOffsetKVCache, VLMDecoder, VLMDecoderConfig, convert_language_model
from .drafters import VLMEagleDrafter, VLMEagleHead
from .eagle3 import eagle3_head_for_vlm, load_eagle3_drafter
from .pipeline_vlm import VLM_METHODS, VLMPipeline, VLMPipelineOutput
from .targets import (
    VLM_FAMILIES,
    LlavaTarget,
    Qwen2VLTarget,
    VLMFamily,
    VLMPrompt,
    VLMTarget,
    load_vlm_target,
    share_vision_modules,
    vlm_family,
)
from .visual_paths import VISUAL_PATHS, VLMEagleConfig

__all__ = [
    "VISUAL_PATHS",
    "VLM_FAMILIES",
    "VLM_METHODS",
    "LlavaTarget",
    "Qwen2VLTarget",
    "RopeOffsetKVCache",
    "VLMDecoder",
    "VLMDecoderConfig",
    "VLMEagleConfig",
    "VLMEagleDrafter",
    "VLMEagleHead",
    "VLMFamily",
    "VLMPipeline",
    "VLMPipelineOutput",
    "VLMPrompt",
    "VLMTarget",
    "convert_language_model",
    "eagle3_head_for_vlm",
    "load_eagle3_drafter",
    "load_vlm_target",
    "share_vision_modules",
    "vlm_family",
]
