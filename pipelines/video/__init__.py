"""Block-autoregressive video generation with reward-routed speculative blocks (SDVG, arXiv
2604.17397): a block-causal video transformer, a frame VAE, the video pipeline and its methods."""

from .modeling_vae import FrameAutoencoderKL
from .modeling_video import BlockCausalVideoTransformer, VideoKVCache, teacher_forcing_mask
from .pipeline_video import VIDEO_METHODS, VideoBlockModel, VideoPipeline, VideoPipelineOutput, check_pair

__all__ = [
    "VIDEO_METHODS",
    "BlockCausalVideoTransformer",
    "FrameAutoencoderKL",
    "VideoBlockModel",
    "VideoKVCache",
    "VideoPipeline",
    "VideoPipelineOutput",
    "check_pair",
    "teacher_forcing_mask",
]
