"""mmspec: speculative decoding for multimodal generative models."""

__version__ = "0.1.0"

from . import relaxed  # noqa: F401  (registers the relaxed acceptance rules: "lantern", "gsd")
