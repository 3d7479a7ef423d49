"""The three loops of the engine, one per generation structure (each on one screen, sharing
stats, the generator discipline and the callback contract):

* :func:`speculative_generate` — *causal*: prefix commits (chains and trees), LM/VLM/LlamaGen.
* :func:`masked_generate` — *masked*: elementwise commits over a set (MuLo-SD, CSpD over MAR).
* :func:`block_generate` — *block*: a router keeps or hands back whole drafted blocks (SDVG).
"""

from .block import BlockOutput, block_generate
from .causal import GenerationOutput, required_cache_len, speculative_generate
from .common import fork_generator, hand_back, outside_inference_mode, resolve_rule
from .masked import MaskedOutput, masked_generate

__all__ = [
    "BlockOutput",
    "GenerationOutput",
    "MaskedOutput",
    "block_generate",
    "fork_generator",
    "hand_back",
    "masked_generate",
    "outside_inference_mode",
    "required_cache_len",
    "resolve_rule",
    "speculative_generate",
]
