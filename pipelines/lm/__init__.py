"""Causal language models from transformers (Llama, Mistral, Qwen2, ...) as mmspec targets, draft models
cut from them, and :class:`LMPipeline` for speculative text generation."""

from .pipeline_lm import LM_METHODS, LMPipeline, LMPipelineOutput
from .target import LMTarget, load_lm

__all__ = ["LM_METHODS", "LMPipeline", "LMPipelineOutput", "LMTarget", "load_lm"]
