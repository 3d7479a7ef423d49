"""mmspec: speculative decoding for multimodal generative models."""

__version__ = "0.1.0"
