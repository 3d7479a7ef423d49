"""Emu3 text-to-image through mmspec: greedy image tokens equal transformers' ``generate`` with the
row-layout ``prefix_allowed_tokens_fn`` and CFG against a negative prompt (the model card's recipe), on
a tiny random model with a ``vocabulary_map``, loaded from a local folder."""

import pytest
import torch

pytest.importorskip("transformers")

from mmspec.pipelines.t2i import Emu3ImagePipeline  # noqa: E402

V_TEXT, CODES, EOL, WRAP, H, W = 40, 16, 30, 34, 3, 3


def tiny_emu3(seed: int = 0):
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    vocab_map = {f"<|visual token {i:06d}|>": V_TEXT + i for i in range(CODES)}
    vocab_map.update(
        {"<|extra_200|>": EOL, "<image>": 31, "<|image start|>": 32, "<|image end|>": 33, "<|extra_101|>": WRAP}
    )
    config = Emu3Config(
        vq_config=dict(
            codebook_size=CODES,
            embed_dim=4,
            latent_channels=4,
            base_channels=32,
            channel_multiplier=[1, 1],
            num_res_blocks=1,
            attn_resolutions=[],
            hidden_size=32,
            num_attention_heads=1,
            temporal_downsample_factor=1,
        ),
        text_config=dict(
            vocab_size=V_TEXT + CODES,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        vocabulary_map=vocab_map,
    )
    torch.manual_seed(seed)
    return Emu3ForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def emu3_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("emu3")
    tiny_emu3().save_pretrained(path)
    return path


PROMPTS = torch.tensor([[1, 5, 7, 9, 32, WRAP], [1, 3, 3, 8, 32, WRAP]])
NEGATIVE = torch.tensor([[1, 0, 0, 0, 32, WRAP], [1, 0, 0, 0, 32, WRAP]])


def _hf_greedy(model, guidance_scale):
    visual = list(range(V_TEXT, V_TEXT + CODES))

    def allowed(batch_id, input_ids):  # the model card's prefix_allowed_tokens_fn, for an H x W grid
        offset = input_ids.shape[0] - int((input_ids == WRAP).nonzero()[0][0])
        return [EOL] if offset % (W + 1) == 0 else visual

    return model.generate(
        PROMPTS,
        attention_mask=torch.ones_like(PROMPTS),
        max_new_tokens=(W + 1) * H,
        do_sample=False,
        prefix_allowed_tokens_fn=allowed,
        guidance_scale=guidance_scale,
        negative_prompt_ids=NEGATIVE,
        pad_token_id=0,
    )[:, PROMPTS.shape[1] :]


@pytest.mark.parametrize(
    "speculative,options",
    [(None, None), ("sjd", None), ("mc-sjd", None), ("mc-sjd", {"coupling": "gumbel", "init": "copy"})],
)
def test_greedy_image_tokens_equal_transformers_generate(emu3_dir, speculative, options):
    pipe = Emu3ImagePipeline.from_pretrained(emu3_dir, height=H, width=W)
    expected = _hf_greedy(pipe.model, 3.0)
    out = pipe(
        PROMPTS,
        negative_prompt_ids=NEGATIVE,
        guidance_scale=3.0,
        temperature=0,
        speculative=speculative,
        speculative_options=options,
        num_draft_tokens=4,
        output_type="tokens",
    )
    assert out.tokens.shape == (2, H, W)
    assert torch.equal(pipe.bpe_sequences(out.tokens), expected)


def test_sampling_images_and_relaxed_rules(emu3_dir, tmp_path):
    pipe = Emu3ImagePipeline.from_pretrained(emu3_dir, height=H, width=W)
    kw = dict(negative_prompt_ids=NEGATIVE, guidance_scale=3.0, speculative="mc-sjd", num_draft_tokens=4)
    out = pipe(PROMPTS, **kw, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape[0] == 2 and out.images.min() >= 0 and out.images.max() <= 1
    assert int((out.stats.token_source >= 0).sum()) == 2 * H * (W + 1)
    exact = pipe(PROMPTS, **kw, generator=torch.Generator().manual_seed(1), output_type="tokens")
    off = pipe(
        PROMPTS,
        **kw,
        generator=torch.Generator().manual_seed(1),
        output_type="tokens",
        acceptance="lantern",
        acceptance_options={"delta": 0.0, "k": 4, "neighbour_cache": tmp_path},
    )
    assert torch.equal(off.tokens, exact.tokens)
    with pytest.raises(ValueError, match="needs negative_prompt_ids"):
        pipe(PROMPTS, guidance_scale=3.0)


def tiny_processor():
    """An Emu3Processor over a word-level tokenizer built offline (left padding)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Emu3ImageProcessor, Emu3Processor, PreTrainedTokenizerFast

    words = {
        "<pad>": 0,
        "<bos>": 1,
        "<eos>": 2,
        "a": 3,
        "red": 4,
        "cat": 5,
        "blurry": 6,
        "3": 11,
        "*": 12,
        "<image>": 31,
        "<|image start|>": 32,
        "<|image end|>": 33,
        "<|image token|>": WRAP,
        "<|extra_201|>": 35,
        "<unk>": 36,
    }
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        extra_special_tokens={
            "image_token": "<image>",
            "boi_token": "<|image start|>",
            "eoi_token": "<|image end|>",
            "image_wrapper_token": "<|image token|>",
            "eof_token": "<|extra_201|>",
        },
    )
    return Emu3Processor(image_processor=Emu3ImageProcessor(), tokenizer=tokenizer)


def test_text_prompts_through_the_processor_saved_with_the_model(emu3_dir, tmp_path):
    folder = tmp_path / "with-processor"
    Emu3ImagePipeline.from_pretrained(emu3_dir, height=H, width=W).model.save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    pipe = Emu3ImagePipeline.from_pretrained(folder, height=H, width=W)
    ids, negative, mask, negative_mask = pipe.encode_prompt(["a red cat", "cat"], negative_prompt="blurry")
    assert ids.shape == negative.shape and ids[:, -1].eq(WRAP).all() and mask[1, 0] == 0
    assert not torch.equal(mask, negative_mask)  # the CFG rows are padded differently
    by_text = pipe(
        prompt=["a red cat", "cat"],
        negative_prompt="blurry",
        guidance_scale=3.0,
        temperature=0,
        speculative="mc-sjd",
        num_draft_tokens=4,
        output_type="tokens",
    )
    # transformers with the same ids and masks (its unbatched CFG runs the negative prompt on its own).
    visual = list(range(V_TEXT, V_TEXT + CODES))

    def allowed(batch_id, input_ids):
        offset = input_ids.shape[0] - int((input_ids == WRAP).nonzero()[0][0])
        return [EOL] if offset % (W + 1) == 0 else visual

    expected = pipe.model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=(W + 1) * H,
        do_sample=False,
        prefix_allowed_tokens_fn=allowed,
        guidance_scale=3.0,
        negative_prompt_ids=negative,
        negative_prompt_attention_mask=negative_mask,
        pad_token_id=0,
    )[:, ids.shape[1] :]
    assert torch.equal(pipe.bpe_sequences(by_text.tokens), expected)
    with pytest.raises(ValueError, match="not both"):
        pipe(ids, prompt="a cat")
