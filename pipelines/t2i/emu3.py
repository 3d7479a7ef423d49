"""Emu3 text-to-image (Wang et al. 2024, arXiv 2409.18869) through transformers'
``Emu3ForConditionalGeneration``, as an mmspec target and pipeline.

transformers generates Emu3 images with the plain ``generate`` plus two user-side pieces (its model
card): a ``prefix_allowed_tokens_fn`` that allows only visual tokens inside a row and the end-of-line
token (``<|extra_200|>``) after every ``width`` of them, and classifier-free guidance against a
negative prompt (``guidance_scale`` + ``negative_prompt_ids``: the unbatched CFG processor, on
log-softmaxed logits). :class:`Emu3ImageTarget` runs the same thing over mmspec's static cache with
its own vocabulary: the ``C`` codebook indices plus one end-of-line token (id ``C``), the LM head's
columns of their BPE ids (``vocabulary_map``), and the row layout enforced by masking (a position is
either a visual token or the end of line). Restricting to the allowed tokens before CFG gives the
same distribution and argmax as CFG over the full vocabulary followed by the mask: unbatched CFG is
``u + g (c - u)`` plus a per-row constant, which softmax and argmax ignore. The negative prompt runs
as the unconditional row of a ``[cond ; uncond]`` pair (padded to the prompt's length; each row keeps
its own left padding, blocked in :class:`Emu3Cache`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mmspec.drafters.factory import register_jacobi_methods
from mmspec.methods import MethodRegistry
from mmspec.sampling import SamplingConfig
from mmspec.types import PrefillOutput, TargetOutput

from ..base import postprocess_images
from ..vlm.decoder import TEXT_ARCHITECTURES, RopeOffsetKVCache, TextArchitecture, convert_language_model
from .base import ImageTokenEmbedding, T2IPipeline, register_eagle_method

# Emu3's text model is a Llama (same module names, RoPE and SwiGLU; ``attention_bias`` covers q, k, v, o):
# the VLM path's static-cache converter reads it once it knows the model type.
TEXT_ARCHITECTURES.setdefault(
    "emu3_text_model", TextArchitecture(qkv_bias=lambda c: c.attention_bias, out_bias=lambda c: c.attention_bias)
)

#: Logit of a token the row layout forbids (finite: CFG of two masked logits stays masked, no NaN).
MASKED = -1e9


@dataclass
class Emu3Prompt:
    """Left-padded prompts ``input_ids`` / ``attention_mask`` ``[B, P]`` and the CFG negative prompts
    ``uncond_ids`` / ``uncond_mask`` ``[B, P]`` (same length, their own padding)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    uncond_ids: torch.Tensor
    uncond_mask: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]


class Emu3Cache(RopeOffsetKVCache):
    """A static cache that also knows where each row's image starts (``image_start [B]``: the cache
    slot of the first generated token, which decides the row layout mask) and lets the two CFG rows
    have their own left padding: ``group_blocked [G*B, S]`` keys invisible to the other queries of
    that physical row, ``uncond_rope_offsets [B]`` the negative prompt's RoPE offset."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.image_start = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        self.uncond_rope_offsets = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        self.group_blocked = torch.zeros(
            self.groups * self.batch_size, self.max_seq_len, dtype=torch.bool, device=self.device
        )

    def reset(self) -> None:
        super().reset()
        self.uncond_rope_offsets.zero_()
        self.group_blocked.zero_()

    def attention_mask(self, slots: torch.Tensor, tree_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The base mask ``[G*B, 1, T, S]`` without the keys blocked in each physical row (a blocked
        query still sees itself, so its softmax is defined)."""
        mask = super().attention_mask(slots, tree_mask)
        key_slots = torch.arange(self.max_seq_len, device=self.device)
        own = (key_slots == slots[..., None]).repeat(self.groups, 1, 1)  # [G*B, T, S]
        return mask & (~self.group_blocked[:, None, :] | own)[:, None]


class Emu3ImageTarget(nn.Module):
    """The image-generation path of an ``Emu3ForConditionalGeneration`` for ``height x width`` token grids.

    Vocabulary: ids ``0 .. C-1`` are codebook indices, ``C`` is the end-of-line token; generated
    sequences are ``height`` rows of ``width`` visual tokens and one end of line (``num_tokens``).
    The converted decoder's output layer keeps only the LM head's rows of these ``C + 1`` BPE ids (the
    same logits as the full head followed by a selection, without computing the text vocabulary's).
    """

    def __init__(self, model: nn.Module, height: int, width: int) -> None:
        super().__init__()
        mapping = model.model.vocabulary_mapping
        if mapping.eol_token_id is None:
            raise ValueError("the model's vocabulary_map has no end-of-line token '<|extra_200|>'")
        codes = model.config.vq_config.codebook_size
        img2bpe = mapping.img2bpe
        missing = [i for i in range(codes) if i not in img2bpe]
        if missing:
            raise ValueError(f"the vocabulary_map lacks visual tokens for codebook indices {missing[:5]}...")
        self.decoder = convert_language_model(model.model.text_model, model.lm_head, model.config.text_config)
        bpe = torch.tensor([img2bpe[i] for i in range(codes)] + [mapping.eol_token_id])
        self.register_buffer("bpe_ids", bpe, persistent=False)  # [C + 1] our id -> BPE id
        self.vocab_size = codes + 1
        full = self.decoder.output.weight
        self.decoder.output = nn.Linear(
            full.shape[1], self.vocab_size, bias=False, device=full.device, dtype=full.dtype
        )
        with torch.no_grad():
            self.decoder.output.weight.copy_(full[bpe.to(full.device)])
        self.image_embedding = ImageTokenEmbedding(
            self.decoder.tok_embeddings, self.vocab_size, self.decoder.config.dim, self.bpe_ids
        )
        self.eol = codes
        self.height, self.width = height, width
        self.num_tokens = height * (width + 1)

    def eagle_modules(self) -> tuple[ImageTokenEmbedding, nn.Linear]:
        """The embedding of our ids (the text model's rows of their BPE ids) and the restricted LM head
        an EAGLE head shares. The head's drafts are not masked by the row layout: a draft that breaks it
        has target probability 0 and is rejected."""
        return self.image_embedding, self.decoder.output

    def new_cache(self, batch_size: int, max_seq_len: int, cfg: bool = False) -> Emu3Cache:
        c, p = self.decoder.config, self.decoder.tok_embeddings.weight
        return Emu3Cache(
            c.n_layer,
            batch_size,
            c.n_kv_head,
            max_seq_len,
            c.head_dim,
            dtype=p.dtype,
            device=p.device,
            groups=2 if cfg else 1,
        )

    def _logits(self, out: TargetOutput, slots: torch.Tensor, cache: Emu3Cache) -> TargetOutput:
        """Mask our vocabulary's logits by the row layout for the tokens that come after ``slots [B, T]``,
        split the CFG halves."""
        logits = out.logits  # [G*B, T, C + 1]
        index = slots + 1 - cache.image_start[:, None]  # [B, T] generated index of the predicted token
        is_eol = (index % (self.width + 1)) == self.width
        allowed = torch.where(
            is_eol[..., None],
            torch.arange(self.vocab_size, device=logits.device) == self.eol,
            torch.arange(self.vocab_size, device=logits.device) != self.eol,
        )  # [B, T, C + 1]
        logits = logits.masked_fill(~allowed.repeat(cache.groups, 1, 1), MASKED)
        if cache.groups == 1:
            return TargetOutput(logits, out.hidden_states)
        cond, uncond = logits.chunk(2)
        hidden, uncond_hidden = out.hidden_states.chunk(2)
        return TargetOutput(cond, hidden, uncond, uncond_hidden)

    def _rope(self, positions: torch.Tensor, cache: Emu3Cache) -> torch.Tensor:
        """RoPE positions ``[G*B, T]`` of cache slots ``positions [B, T]`` for both CFG rows."""
        rope = positions + cache.rope_offsets[:, None]
        if cache.groups == 1:
            return rope
        return torch.cat([rope, positions + cache.uncond_rope_offsets[:, None]])

    def prefill(self, prompt: Emu3Prompt, cache: Emu3Cache) -> PrefillOutput:
        """Write and commit the prompt (and the negative prompt as the unconditional row)."""
        if prompt.batch_size != cache.batch_size:
            raise ValueError(f"the prompt has {prompt.batch_size} rows but the cache {cache.batch_size}")
        length = prompt.input_ids.shape[1]
        if length > cache.max_seq_len:
            raise ValueError(f"the cache holds {cache.max_seq_len} positions, fewer than the {length}-token prompt")
        masks = [prompt.attention_mask, prompt.uncond_mask][: cache.groups]
        ids = torch.cat([prompt.input_ids, prompt.uncond_ids][: cache.groups])
        cache.group_blocked[:, :length] = ~torch.cat(masks).to(torch.bool)
        cache.rope_offsets.copy_(-(length - prompt.attention_mask.sum(1)))
        cache.uncond_rope_offsets.copy_(-(length - prompt.uncond_mask.sum(1)))
        cache.image_start.fill_(length)
        slots = torch.arange(length, device=ids.device).expand(cache.batch_size, -1)
        rope = self._rope(slots, cache).clamp(min=0)
        out = self.decoder(ids, rope, cache)
        cache.commit(torch.full((cache.batch_size,), length, dtype=torch.long, device=cache.device))
        last = TargetOutput(out.logits[:, -1:], out.hidden_states[:, -1:])
        return PrefillOutput(
            self._logits(last, cache.lengths[:, None] - 1, cache),
            hidden_states_all=out.hidden_states[: cache.batch_size],
        )

    def forward(
        self,
        tokens: torch.Tensor,  # [B, T] our ids (codebook index or end of line)
        positions: torch.Tensor,  # [B, T] cache slots
        cache: Emu3Cache,
        attn_mask: torch.Tensor | None = None,  # [G*B, 1, T, S] bool, None = causal
    ) -> TargetOutput:
        """Run generated tokens at the next ``T`` cache slots (both CFG rows; written, not committed)."""
        bpe = self.bpe_ids[tokens].repeat(cache.groups, 1)
        return self._logits(self.decoder(bpe, self._rope(positions, cache), cache, attn_mask), positions, cache)

    __call__ = forward


#: Emu3's speculative methods: SJD / MC-SJD (training-free) and EAGLE (a head trained for the target).
EMU3_METHODS = MethodRegistry("Emu3ImagePipeline")


register_jacobi_methods(EMU3_METHODS, lambda pipe: pipe.target.width + 1)
register_eagle_method(EMU3_METHODS, "`mmspec train-drafter --target-kind emu3`")


class Emu3ImagePipeline(T2IPipeline):
    """Text-to-image with Emu3, with or without speculative decoding (``"sjd"``, ``"mc-sjd"``, ``"eagle"``).

    Args:
        model: a ``transformers.Emu3ForConditionalGeneration`` (its config's ``vocabulary_map`` maps
            visual tokens and ``<|extra_200|>`` to BPE ids).
        height, width: the token grid to generate (Emu3's processor writes ``{h}*{w}`` into the prompt);
            recorded in the folder by ``save_pretrained``, so ``from_pretrained`` of such a folder needs
            them only to override.
        processor: an ``Emu3Processor`` (left padding), for ``prompt=``; None: pass token ids.
        eagle: an EAGLE head trained for this model and grid (optional component; see :class:`T2IPipeline`).
    """

    methods = EMU3_METHODS
    model_class: ClassVar[str] = "Emu3ForConditionalGeneration"
    model_type: ClassVar[str] = "emu3"
    settings: ClassVar[tuple[str, ...]] = ("height", "width")

    def __init__(self, model: nn.Module, height: int, width: int, processor: Any = None, eagle: Any = None) -> None:
        self.height, self.width = height, width
        self.token_grid = (height, width + 1)  # the generated tokens, ends of line as the last column
        super().__init__(model, Emu3ImageTarget(model, height, width), processor, eagle)

    def encode_prompt(self, prompt: str | list[str], negative_prompt: str | list[str] = "") -> tuple[torch.Tensor, ...]:
        """``(input_ids, negative_prompt_ids, attention_mask, negative_prompt_attention_mask)`` ``[B, P]`` for
        text prompts: Emu3's processor in image-generation mode (``<|image start|>{h}*{w}<|image token|>``
        appended), prompts and negative prompts padded together to one length (the CFG pair shares the
        cache's slots; each keeps its own padding)."""
        if self.processor is None:
            raise ValueError("prompt= needs the pipeline's processor (Emu3Processor); or pass input_ids")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
        h, w = self.target.height, self.target.width
        enc = self.processor(
            text=prompts + negatives,
            return_for_image_generation=True,
            ratio=f"{w}:{h}",
            image_area=h * w * self.processor.downsample_ratio**2,
            padding=True,
            return_tensors="pt",
        )
        if [list(x) for x in enc["image_sizes"]][0] != [h, w]:
            raise ValueError(f"the processor laid out a {enc['image_sizes'][0]} grid, the pipeline generates {h}x{w}")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if not bool(mask[:, -1].all()):
            raise ValueError("the processor's tokenizer must pad on the left (tokenizer.padding_side = 'left')")
        n = len(prompts)
        return ids[:n], ids[n:], mask[:n], mask[n:]

    def prompt_inputs(
        self,
        prompt: str | list[str] | None = None,
        input_ids: torch.Tensor | None = None,  # [B, P] left-padded
        attention_mask: torch.Tensor | None = None,  # [B, P]
        cfg: bool = True,
        negative_prompt: str | list[str] = "",
        negative_prompt_ids: torch.Tensor | None = None,  # [B, P]
        negative_prompt_attention_mask: torch.Tensor | None = None,  # [B, P]
    ) -> Emu3Prompt:
        """The target's prompt for text ``prompt`` (through the processor, with ``negative_prompt``) or
        token ids (with ``negative_prompt_ids``); ``cfg``: the negative prompt is needed (guidance scale > 1)."""
        if prompt is not None:
            if input_ids is not None or negative_prompt_ids is not None:
                raise ValueError("pass prompt (text) or input_ids / negative_prompt_ids (tokens), not both")
            input_ids, negative_prompt_ids, attention_mask, negative_prompt_attention_mask = self.encode_prompt(
                prompt, negative_prompt
            )
        if input_ids is None:
            raise ValueError("pass prompt (with a processor) or input_ids [B, P]")
        device = self.device
        input_ids = input_ids.to(device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        if cfg:
            if negative_prompt_ids is None or negative_prompt_ids.shape != input_ids.shape:
                raise ValueError(
                    "guidance_scale > 1 needs negative_prompt_ids of the prompt's shape [B, P] "
                    "(left-padded, with negative_prompt_attention_mask)"
                )
            uncond = negative_prompt_ids.to(device)
            uncond_mask = (
                torch.ones_like(uncond)
                if negative_prompt_attention_mask is None
                else negative_prompt_attention_mask.to(device)
            )
        else:
            uncond, uncond_mask = input_ids, mask
        return Emu3Prompt(input_ids, mask, uncond, uncond_mask)

    def rule_resources(self) -> dict:
        """The VQ codebook (the end-of-line token gets a far-away vector: nobody's latent neighbour)."""
        from ..llamagen.pipeline_llamagen import NEIGHBOUR_CACHE

        codebook = self.model.model.vqmodel.quantize.embedding.weight.detach().float()
        far = torch.full_like(codebook[:1], 1e6)
        embeddings = self.target.decoder.tok_embeddings.weight.detach().float()[self.target.bpe_ids]
        return {
            "codebook": torch.cat([codebook, far]),
            "token_embeddings": embeddings,
            "grid": (self.target.height, self.target.width + 1),
            "cache_dir": NEIGHBOUR_CACHE,
            "memo": self._rule_memo,
        }

    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor | None = None,  # [B, P] left-padded prompts ending where the image starts
        negative_prompt_ids: torch.Tensor | None = None,  # [B, P] the CFG negative prompt (same length)
        attention_mask: torch.Tensor | None = None,  # [B, P]
        negative_prompt_attention_mask: torch.Tensor | None = None,  # [B, P]
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] = "",
        guidance_scale: float = 3.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        speculative: str | None = None,
        num_draft_tokens: int = 8,
        acceptance: str | None = None,
        acceptance_options: dict | None = None,
        speculative_options: dict | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Emu3ImagePipeline, int, None, dict], dict] | None = None,
        profile: bool = False,
    ):
        """Generate ``height x width`` token images for ``input_ids`` or text ``prompt`` (with the processor;
        ``negative_prompt`` is the CFG negative, default empty). ``guidance_scale > 1`` with token ids needs
        ``negative_prompt_ids``.
        ``output_type``: ``"pil"``, ``"np"``, ``"pt"`` (Emu3's VQ decoder) or ``"tokens"``. The output
        ``tokens`` are codebook indices ``[B, height, width]`` (ends of line removed).
        ``callback_on_step_end``: ``f(pipe, step, None, {"num_generated": [B], "tokens": [B, N]})`` after every
        verify step (diffusers convention; ``tokens``: the ``height x (width + 1)`` raster-order ids so far,
        ends of line included, -1 where not generated yet). ``set_progress_bar_config(disable=True)`` hides
        the progress bar. ``profile``: time the loop's phases (``stats.draft_time`` / ``verify_time`` /
        ``accept_time``), for breakdowns."""
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, guidance_scale=guidance_scale)
        emu3_prompt = self.prompt_inputs(
            prompt,
            input_ids,
            attention_mask,
            sampling.uses_cfg,
            negative_prompt,
            negative_prompt_ids,
            negative_prompt_attention_mask,
        )
        spec = self.resolve_speculation(speculative, speculative_options, acceptance, acceptance_options)
        out = self.generate_tokens(
            emu3_prompt,
            emu3_prompt.input_ids.shape[1],
            self.target.num_tokens,
            sampling,
            spec,
            num_draft_tokens,
            generator,
            callback_on_step_end,
            profile,
        )
        h, w = self.target.height, self.target.width
        return self.finish(out.tokens.view(-1, h, w + 1)[..., :w], out.stats, output_type, return_dict)

    def bpe_sequences(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes [B, h, w]`` as the BPE ids transformers' ``generate`` emits (rows ended by end of line)."""
        eol = torch.full_like(codes[..., :1], self.target.eol)
        return self.target.bpe_ids[torch.cat([codes, eol], -1)].flatten(1)

    def decode(self, codes: torch.Tensor, output_type: str):
        """Codebook indices ``codes [B, h, w]`` through Emu3's VQ decoder, as ``output_type``."""
        pixels = self.model.model.vqmodel.decode(codes)  # [B, 3, H, W] in [-1, 1]
        return postprocess_images(pixels, output_type, extra=("tokens",))
