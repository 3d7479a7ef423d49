"""What the text-to-image pipelines over transformers models (Janus / Janus-Pro, Emu3) share: the
pipeline scaffolding (progress bar, ``.to``, ``save_pretrained`` / ``from_pretrained`` of a local
folder, one image-token generation per call, the output type) and the optional ``eagle`` component
with its ``speculative="eagle"`` method.

On disk a pipeline is the transformers checkpoint of its model (``model.save_pretrained``), the
processor's files when it has one, a ``model_index.json`` naming the pipeline class (and its settings,
e.g. Emu3's token grid) and, with an EAGLE head, the head in ``eagle/`` (``config.json`` +
``model.safetensors``, what ``mmspec train-drafter`` writes). A plain transformers folder loads too.

EAGLE here (Li et al. 2024, arXiv 2401.15077; EAGLE-2 trees, arXiv 2406.16858) drafts image tokens:
the head reads the target's last hidden state ``f_t`` (post-norm, before the image head) with the
image-token embedding of ``x_{t+1}`` and predicts ``f_{t+1}``; the target's own image head turns it
into the next image token's distribution over the image-token vocabulary. The text prompt is a
condition prefix: its positions hold no pair (no image token follows them), exactly as LlamaGen's
class / caption prefix, so the engine's :class:`~mmspec.drafters.eagle.EagleDrafter` runs unchanged,
chains and trees, with or without CFG.
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mmspec.checkpoint_io import check_safetensors_files, read_json
from mmspec.drafters.eagle import EagleConfig, EagleDrafter, EagleHead, check_target, target_fingerprint
from mmspec.drafters.factory import eagle_method
from mmspec.loops import GenerationOutput, required_cache_len
from mmspec.methods import MethodRegistry
from mmspec.sampling import SamplingConfig
from mmspec.stats import SpecStats

from ..base import Speculation, SpeculativePipelineMixin, generate_image_tokens

#: The pipeline folder's record of the pipeline class and its settings (diffusers' file name).
INDEX_NAME = "model_index.json"
#: The subfolder of a saved pipeline that holds its EAGLE head.
EAGLE_FOLDER = "eagle"


@dataclass
class T2IPipelineOutput:
    """``images``: PIL list / ``np.ndarray [B, H, W, 3]`` / ``torch.Tensor [B, 3, H, W]`` in [0, 1]
    (None for ``output_type="tokens"``); ``tokens``: ``[B, h, w]`` image tokens (codebook indices);
    ``stats``: SpecStats."""

    images: Any
    tokens: torch.Tensor
    stats: SpecStats


class ImageTokenEmbedding(nn.Module):
    """Image-token ids ``[...]`` -> the decoder's input embeddings ``[..., H]``: ``embed`` (any module
    from ids to ``H``), read through ``ids`` (``[V]`` our id -> the module's id; None = the same id).
    It is what an EAGLE head pairs with the target's features (``num_embeddings`` / ``embedding_dim``
    are what :class:`~mmspec.drafters.eagle.TargetModules` reads)."""

    def __init__(self, embed: nn.Module, num_embeddings: int, embedding_dim: int, ids: torch.Tensor | None = None):
        super().__init__()
        self.embed = embed
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("ids", ids, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens if self.ids is None else self.ids[tokens])


class ImageTokenHead(nn.Module):
    """A decoder's image-token output layer (any module from ``in_features`` to ``out_features``, e.g.
    Janus's two-layer ``generation_head``) with the sizes :class:`~mmspec.drafters.eagle.TargetModules`
    reads."""

    def __init__(self, head: nn.Module, in_features: int, out_features: int) -> None:
        super().__init__()
        self.head = head
        self.in_features, self.out_features = in_features, out_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


def register_eagle_method(registry: MethodRegistry, command: str) -> None:
    """Register ``"eagle"`` on a t2i pipeline's ``registry`` (``command``: how to train a head, for the
    error when the pipeline has none)."""

    @registry.register("eagle", options={"tree": None}, requires=("eagle",))
    def _eagle(pipe: T2IPipeline, options: dict) -> EagleDrafter:
        """EAGLE feature-level drafting of image tokens (the ``eagle`` component): a chain, or an EAGLE-2
        dynamic tree (``tree``: a TreeConfig)."""
        return eagle_method(pipe.eagle, options, command)


class T2IPipeline(SpeculativePipelineMixin, abc.ABC):
    """Base of the text-to-image pipelines over a transformers model.

    Subclasses set ``methods``, ``model_class`` (the transformers class name), ``model_type`` and
    ``settings`` (their ``__init__`` arguments recorded in ``model_index.json``), build their target
    (which provides ``new_cache``, ``prefill``, ``forward``, ``vocab_size``, ``num_tokens`` and
    ``eagle_modules()``: the image-token embedding and head an EAGLE head shares), set ``token_grid``
    (``(h, w)`` of the generated tokens in raster order), implement :meth:`prompt_inputs` and
    :meth:`decode`, and call :meth:`generate_tokens` and :meth:`finish`.

    Args:
        model: the transformers model.
        target: the mmspec target over it.
        processor: the model's processor (for ``prompt=``), or None.
        eagle: an :class:`~mmspec.drafters.eagle.EagleHead` trained for this target (the optional
            ``eagle`` component), or None; a head trained for another target is refused.
    """

    methods: ClassVar[MethodRegistry]
    model_class: ClassVar[str]
    #: The ``model_type`` of the transformers ``config.json`` this pipeline loads.
    model_type: ClassVar[str]
    settings: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module, target: nn.Module, processor: Any = None, eagle: EagleHead | None = None):
        self.model = model.eval()
        self.target = target
        self.processor = processor
        self.eagle: EagleHead | None = None
        self._window_memo: dict = {}
        self._rule_memo: dict = {}
        if eagle is not None:
            self.attach_eagle_head(eagle)

    # ------------------------------------------------------------------ diffusers conventions
    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """diffusers' progress-bar settings (tqdm keyword arguments, e.g. ``disable=True``)."""
        self._progress_bar_config = kwargs

    def progress_bar(self, total: int):
        from tqdm.auto import tqdm

        return tqdm(total=total, **getattr(self, "_progress_bar_config", {}))

    @property
    def device(self) -> torch.device:
        return self.target.decoder.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.target.decoder.tok_embeddings.weight.dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> T2IPipeline:
        """Move (and cast) every component: the model, the target's converted decoder, the EAGLE head
        (``pipe.to("cuda")``, ``pipe.to(torch.bfloat16)``, ``pipe.to(device, dtype)``). Returns the pipeline."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        for module in (self.model, self.target, self.eagle):
            if module is not None:
                module.to(device=device, dtype=dtype)
        self._rule_memo.clear()  # rule tables were built on the old device / dtype
        return self

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the model (transformers), the processor, ``model_index.json`` and the EAGLE head (``eagle/``)."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        if self.processor is not None:
            self.processor.save_pretrained(directory)
        index = {"_class_name": type(self).__name__, **{name: getattr(self, name) for name in self.settings}}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if self.eagle is not None:
            self.eagle.save_pretrained(directory / EAGLE_FOLDER)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, torch_dtype: torch.dtype | None = None, **kwargs) -> T2IPipeline:
        """Load a local folder: a pipeline written by :meth:`save_pretrained`, or a transformers folder
        (``model.save_pretrained``; its processor is loaded when the folder has one), in ``torch_dtype``
        (default: as stored). ``kwargs``: the pipeline's ``__init__`` arguments, over those recorded in
        ``model_index.json``. Called on ``T2IPipeline`` itself, it loads the pipeline class the folder is for.

        Raises:
            ValueError: ``model_index.json`` names another pipeline class, or the folder is not a Janus /
                Emu3 model.
        """
        import transformers

        path = Path(path)
        if cls is T2IPipeline:
            return _folder_pipeline_class(path).from_pretrained(path, torch_dtype, **kwargs)
        settings = {}
        if (path / INDEX_NAME).is_file():
            index = read_json(path / INDEX_NAME)
            if index.get("_class_name") != cls.__name__:
                raise ValueError(f"{path} holds a {index.get('_class_name')!r} pipeline, not a {cls.__name__}")
            settings = {name: index[name] for name in cls.settings if name in index}
        check_safetensors_files(path)  # transformers' SafetensorError would not say which file
        model = getattr(transformers, cls.model_class).from_pretrained(path, dtype=torch_dtype)
        processor = None
        if (path / "processor_config.json").exists() or (path / "tokenizer_config.json").exists():
            processor = transformers.AutoProcessor.from_pretrained(path)
        settings.update(kwargs)
        missing = [name for name in cls.settings if name not in settings]
        if missing:
            raise ValueError(
                f"{path} does not record {missing} (a plain transformers folder): pass them to from_pretrained "
                "(mmspec generate: --emu3-grid HxW; mmspec bench: --option grid=HxW)"
            )
        pipe = cls(model, processor=processor, **settings)
        if (path / EAGLE_FOLDER).is_dir():
            pipe.load_eagle_head(path / EAGLE_FOLDER)
        return pipe

    # ------------------------------------------------------------------ the EAGLE component
    def load_eagle_head(self, path: str | os.PathLike) -> T2IPipeline:
        """Attach the EAGLE head saved in ``path`` (``mmspec train-drafter``, or a pipeline's ``eagle/``).
        Returns the pipeline.

        Raises:
            ValueError: no head in ``path``, or a head trained for another target.
        """
        self.attach_eagle_head(EagleHead.load(path), source=str(path))
        return self

    def attach_eagle_head(self, head: EagleHead, source: str = "the given EAGLE head") -> None:
        """Make ``head`` the ``eagle`` component: checked against this target (fingerprint of its image
        head, vocabulary and width), sharing its image-token embedding and head, on its device and dtype."""
        embed, lm_head = self.target.eagle_modules()
        check_target(head.config, embed, target_fingerprint(lm_head), source)
        self.eagle = head.share_target(embed, lm_head).to(device=self.device, dtype=self.dtype).eval()

    def new_eagle_head(self, n_head: int | None = None) -> EagleHead:
        """An untrained EAGLE head for this target (``n_head``: attention heads, default the target's),
        named by the fingerprint of its image head, for :mod:`mmspec.training.eagle`."""
        embed, lm_head = self.target.eagle_modules()
        config = self.target.decoder.config
        head = EagleHead(
            EagleConfig(
                hidden_size=config.dim,
                n_head=n_head or config.n_head,
                vocab_size=self.target.vocab_size,
                target_name=target_fingerprint(lm_head),
                norm_eps=config.norm_eps,
            ),
            embed,
            lm_head,
        )
        return head.to(device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ one call
    @abc.abstractmethod
    def prompt_inputs(
        self,
        prompt: str | list[str] | None = None,
        input_ids: torch.Tensor | None = None,  # [B, P] left-padded
        attention_mask: torch.Tensor | None = None,  # [B, P]
        cfg: bool = True,
    ) -> Any:
        """The target's prompt for text ``prompt`` (through the processor) or token ids; ``cfg``: the
        prompt feeds classifier-free guidance (its unconditional row is needed). ValueError for bad input."""

    @abc.abstractmethod
    def decode(self, codes: torch.Tensor, output_type: str) -> Any:
        """Image tokens ``codes [B, h, w]`` through the family's VQ decoder, as ``output_type``."""

    def generate_tokens(
        self,
        prompt: Any,
        prompt_len: int,
        num_tokens: int,
        sampling: SamplingConfig,
        spec: Speculation,
        num_draft_tokens: int,
        generator: torch.Generator | None,
        callback_on_step_end: Callable | None,
        profile: bool = False,
    ) -> GenerationOutput:
        """``num_tokens`` image tokens for ``prompt`` (the target's prompt type, ``prompt_len`` positions)
        through the causal loop, on a cache sized for the call's draft window (``profile``: the loop's
        phase timing)."""
        window = 1 if spec.drafter is None else spec.drafter.verify_width(num_draft_tokens)
        cache = self.target.new_cache(
            prompt.batch_size, required_cache_len(prompt_len, num_tokens, window), cfg=sampling.uses_cfg
        )
        return generate_image_tokens(
            self,
            self.target,
            prompt,
            cache,
            num_tokens,
            spec,
            num_draft_tokens,
            sampling,
            generator,
            callback_on_step_end,
            profile,
        )

    def finish(self, codes: torch.Tensor, stats: SpecStats, output_type: str, return_dict: bool):
        """The call's output for image tokens ``codes [B, h, w]``: decoded by the subclass's ``decode``
        unless ``output_type="tokens"``; a :class:`T2IPipelineOutput`, or ``(images, tokens, stats)``."""
        images = None if output_type == "tokens" else self.decode(codes, output_type)
        if not return_dict:
            return images, codes, stats
        return T2IPipelineOutput(images=images, tokens=codes, stats=stats)


def _folder_pipeline_class(path: Path) -> type[T2IPipeline]:
    """The :class:`T2IPipeline` subclass for the folder ``path`` (``model_index.json`` ``_class_name``,
    else ``config.json`` ``model_type``). The package's ``__init__`` defines every subclass before
    anything here can run."""
    classes = T2IPipeline.__subclasses__()
    for name, key in ((INDEX_NAME, "_class_name"), ("config.json", "model_type")):
        if (path / name).is_file():
            value = read_json(path / name).get(key)
            for pipeline_class in classes:
                if value in (pipeline_class.__name__, getattr(pipeline_class, "model_type", None)):
                    return pipeline_class
            known = ", ".join(sorted(c.__name__ if key == "_class_name" else c.model_type for c in classes))
            raise ValueError(f"{path / name}: {key} {value!r} is not a text-to-image pipeline of mmspec ({known})")
    raise ValueError(f"{path} holds neither {INDEX_NAME} nor a transformers config.json")
