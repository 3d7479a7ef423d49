"""Text-to-image AR targets through transformers (Janus / Janus-Pro, Emu3), with mmspec's loop, SJD / MC-SJD,
EAGLE heads and the relaxed image rules."""

from .base import T2IPipeline, T2IPipelineOutput
from .emu3 import EMU3_METHODS, Emu3ImagePipeline, Emu3ImageTarget
from .janus import JANUS_METHODS, JanusImagePipeline, JanusImageTarget, JanusPrompt

__all__ = [
    "EMU3_METHODS",
    "Emu3ImagePipeline",
    "Emu3ImageTarget",
    "JANUS_METHODS",
    "JanusImagePipeline",
    "JanusImageTarget",
    "JanusPrompt",
    "T2IPipeline",
    "T2IPipelineOutput",
]
