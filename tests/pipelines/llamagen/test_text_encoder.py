"""LlamaGen t2i ``prompt=``: a user-given T5 encoder folder, features laid out as the official sampler does."""

import pytest
import torch

pytest.importorskip("transformers")

from mmspec.pipelines.llamagen import LlamaGenPipeline  # noqa: E402
from mmspec.pipelines.llamagen.text_encoder import encode_prompts  # noqa: E402

from ...conftest import tiny_llamagen  # noqa: E402


def _t5_folder(path, d_model=24):
    """A tiny random T5 encoder + a word-level tokenizer (right padding) saved like the hub's flan-t5-xl."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    torch.manual_seed(0)
    T5EncoderModel(
        T5Config(vocab_size=32, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    ).save_pretrained(path)
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", "a", "red", "cat", "on", "the", "mat", "dog"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", padding_side="right"
    ).save_pretrained(path)
    return path


def _official_layout(encoder, tokenizer, prompts, max_length):
    """LlamaGen's T5Embedder.get_text_embeddings + sample_t2i.py's left padding, written as they are."""
    enc = tokenizer(
        prompts,
        max_length=max_length,
        padding="max_length",
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    caption_embs = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])["last_hidden_state"]
    emb_masks = enc["attention_mask"]
    new_emb_masks = torch.flip(emb_masks, dims=[-1])
    new_caption_embs = []
    for caption_emb, emb_mask in zip(caption_embs, emb_masks):
        valid_num = int(emb_mask.sum().item())
        new_caption_embs.append(torch.cat([caption_emb[valid_num:], caption_emb[:valid_num]]))
    return torch.stack(new_caption_embs), new_emb_masks


def test_prompt_equals_official_prompt_embeds(tmp_path):
    gpt, vq = tiny_llamagen(model_type="t2i")
    pipe = LlamaGenPipeline(target=gpt, vq=vq).load_text_encoder(str(_t5_folder(tmp_path / "t5")))
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red cat on the mat", "dog"]
    embeds, mask = _official_layout(pipe.text_encoder, pipe.tokenizer, prompts, 6)
    mine, my_mask = encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts, gpt.config.cls_token_num)
    assert torch.equal(my_mask, mask) and torch.allclose(mine, embeds) and mask[1, 0] == 0  # "dog" is left padded
    kw = dict(guidance_scale=2.0, speculative="mc-sjd", num_draft_tokens=3, output_type="pt")
    a = pipe(prompt=prompts, generator=torch.Generator().manual_seed(0), **kw)
    b = pipe(prompt_embeds=embeds, prompt_attention_mask=mask, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(a.tokens, b.tokens)
    # The encoder and tokenizer are registered components: they move with .to() and round-trip.
    pipe.to(dtype=torch.float64)
    assert pipe.text_encoder.dtype == torch.float64
    pipe.to(dtype=torch.float32)
    pipe.save_pretrained(tmp_path / "saved")
    loaded = LlamaGenPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(loaded(prompt=prompts, generator=torch.Generator().manual_seed(0), **kw).tokens, a.tokens)


def test_prompt_errors(tmp_path):
    gpt, vq = tiny_llamagen(model_type="t2i")
    with pytest.raises(ValueError, match="needs a text encoder"):
        LlamaGenPipeline(target=gpt, vq=vq)(prompt="a cat")
    c2i, vq = tiny_llamagen()
    with pytest.raises(ValueError, match="serves text-conditional"):
        LlamaGenPipeline(target=c2i, vq=vq).load_text_encoder(str(tmp_path))
