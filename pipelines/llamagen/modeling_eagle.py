"""``LlamaGenEagleHead``: an EAGLE head (:class:`mmspec.drafters.EagleHead`) as a diffusers pipeline
component, so that ``pipe.to(...)`` moves it, ``save_pretrained`` writes it to its own subfolder and
``from_pretrained`` loads it back (diffusers loads a component by the module and class recorded in
``model_index.json`` and saves any :class:`~diffusers.ModelMixin` subclass).

The engine's ``EagleHead`` stays a plain ``nn.Module`` (the engine imports no diffusers); this class
owns one, and keeps its on-disk format: ``config.json`` (the :class:`~mmspec.drafters.eagle.EagleConfig`
fields) and ``model.safetensors``, what ``mmspec train-drafter`` writes and
``LlamaGenPipeline.load_eagle_head`` reads. The head shares the target's token embedding and LM head,
which are not saved with it: the pipeline binds it to its target with :meth:`LlamaGenEagleHead.bind`,
which refuses a head trained for another target.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from mmspec.drafters.eagle import (
    CONFIG_NAME,
    EagleConfig,
    EagleHead,
    check_target,
    target_fingerprint,
)

from ..component_mixin import ComponentMixin
from .modeling_gpt import LlamaGenGPT


class LlamaGenEagleHead(ComponentMixin, ModelMixin, ConfigMixin):
    """A LlamaGen pipeline's EAGLE head (the optional component ``eagle``).

    Args: the :class:`~mmspec.drafters.eagle.EagleConfig` fields (``target_name`` is the fingerprint of
    the target the head was trained for, :func:`~mmspec.drafters.eagle.target_fingerprint`).
    """

    config_name = CONFIG_NAME

    @register_to_config
    def __init__(
        self,
        hidden_size: int,
        n_head: int,
        vocab_size: int,
        target_name: str,
        multiple_of: int = 64,
        norm_eps: float = 1e-5,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        self.head = EagleHead(
            EagleConfig(
                hidden_size=hidden_size,
                n_head=n_head,
                vocab_size=vocab_size,
                target_name=target_name,
                multiple_of=multiple_of,
                norm_eps=norm_eps,
                rope_base=rope_base,
            )
        )
        self.source = "the pipeline's `eagle` component"  # named in errors; from_pretrained sets its folder

    @classmethod
    def from_head(cls, head: EagleHead) -> LlamaGenEagleHead:
        """Wrap a trained ``head`` (its weights are taken over, not copied; its target sharing kept)."""
        component = cls(**vars(head.config))
        component.head = head
        return component

    def bind(self, target: LlamaGenGPT) -> LlamaGenEagleHead:
        """Share ``target``'s token embedding and LM head with the head, after checking that the head
        was trained for exactly this target (fingerprint of its LM head). Returns self.

        Raises:
            ValueError: the head belongs to another target (the message names both, and the head's folder).
        """
        check_target(self.head.config, target.tok_embeddings, target_fingerprint(target.output), self.source)
        self.head.share_target(target.tok_embeddings, target.output)
        return self

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write ``config.json`` and ``model.safetensors`` (the head's own weights, in their dtype).
        ``kwargs``: ``ModelMixin.save_pretrained``'s options (``safe_serialization``, ``variant``, ...),
        accepted for compatibility; the head is always one safetensors file."""
        self.head.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        device_map: str | torch.device | None = None,
        **kwargs,
    ) -> LlamaGenEagleHead:
        """Load a head saved by :meth:`save_pretrained` (or ``mmspec train-drafter``) from a local folder,
        not yet bound to a target (see :meth:`bind`).

        Args:
            pretrained_model_name_or_path: the folder (or the pipeline's folder with ``subfolder``).
            torch_dtype: cast the weights (default: as stored); ``dtype`` is accepted as its alias.
            device_map: a single device to load onto (diffusers' pipeline ``device_map`` strategies such
                as ``"balanced"`` place whole components; a device name is accepted here).
            kwargs: diffusers' other model-loading options (``variant``, ``low_cpu_mem_usage``, ...),
                which do not apply to a single small safetensors file.

        Raises:
            ValueError: the folder holds no EAGLE head, another model's config, or mismatched weights.
        """
        directory = Path(pretrained_model_name_or_path) / (subfolder or "")
        if isinstance(device_map, dict):
            raise TypeError("an EAGLE head loads onto one device: pass device_map as a device name, not a dict")
        torch_dtype = torch_dtype if torch_dtype is not None else kwargs.get("dtype")
        component = cls.from_head(EagleHead.load(directory))
        component.source = str(directory)
        return component.to(device=device_map, dtype=torch_dtype).eval()
