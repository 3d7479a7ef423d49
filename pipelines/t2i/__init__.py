"""Text-to-image AR targets through transformers (Janus / Janus-Pro), with mmspec's loop, SJD / MC-SJD
and the relaxed image rules."""

from .janus import JANUS_METHODS, JanusImagePipeline, JanusImagePipelineOutput, JanusImageTarget, JanusPrompt

__all__ = ["JANUS_METHODS", "JanusImagePipeline", "JanusImagePipelineOutput", "JanusImageTarget", "JanusPrompt"]
