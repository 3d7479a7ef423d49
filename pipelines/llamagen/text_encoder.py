"""Text prompts for LlamaGen's text-to-image models: the official t2i checkpoints condition on
FLAN-T5-XL encoder features (LlamaGen ``language/t5.py`` + ``sample_t2i.py``): the prompt is tokenized
to ``max_length`` 120 (right padding, truncation), encoded by ``T5EncoderModel``, and then the valid
features are moved to the end of the sequence ("left padding"; ``sample_t2i.py`` without
``--no-left-padding``): features ``[valid ; padded]`` become ``[padded ; valid]`` and the mask is
flipped. :func:`encode_prompts` does exactly that with the pipeline's ``text_encoder`` and
``tokenizer`` components, loaded by :func:`load_t5` from a user-given local folder (the hub's
``google/flan-t5-xl`` saved with ``save_pretrained``: model and tokenizer)."""

from __future__ import annotations

import os

import torch


@torch.no_grad()
def encode_prompts(encoder, tokenizer, prompts: str | list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> ``(prompt_embeds [B, L, D], prompt_attention_mask [B, L])`` as LlamaGen's t2i sampler
    makes them (``L = max_length``, LlamaGen's ``cls_token_num``: 120 for the official models).

    Args:
        encoder: a ``transformers.T5EncoderModel``. tokenizer: its tokenizer (right padding).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    enc = tokenizer(
        prompts,
        max_length=max_length,
        padding="max_length",
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    device = next(encoder.parameters()).device
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    if tokenizer.padding_side != "right" and not bool(mask[:, 0].all()):
        raise ValueError("the T5 tokenizer must pad on the right (LlamaGen moves the valid tokens itself)")
    features = encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, D]
    valid = mask.sum(1)  # [B]
    # [valid ; padded] -> [padded ; valid]: roll each row left by its valid count (sample_t2i.py).
    index = (torch.arange(ids.shape[1], device=device)[None] + valid[:, None]) % ids.shape[1]
    embeds = features.gather(1, index[..., None].expand(-1, -1, features.shape[-1]))
    return embeds, mask.flip(-1)


def load_t5(path: str | os.PathLike, device: torch.device | str = "cpu", torch_dtype: torch.dtype | None = None):
    """``(T5EncoderModel, tokenizer)`` from a local folder (no hub access is attempted)."""
    from transformers import AutoTokenizer, T5EncoderModel

    encoder = T5EncoderModel.from_pretrained(path, dtype=torch_dtype, local_files_only=True).to(device).eval()
    return encoder, AutoTokenizer.from_pretrained(path, local_files_only=True)
