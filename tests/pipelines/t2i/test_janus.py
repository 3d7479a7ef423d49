"""Janus(-Pro) text-to-image through mmspec: greedy image tokens equal transformers' own image-mode
``generate`` on a tiny random model (baseline, SJD, MC-SJD), loaded from a local folder."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mmspec.pipelines.t2i import JanusImagePipeline  # noqa: E402

from ...conftest import assert_rows_follow  # noqa: E402

BOS, BOI, PAD = 1, 62, 0


def tiny_janus(seed: int = 0, sharpness: float = 1.0):
    """A random JanusForConditionalGeneration: 16 image tokens (4 x 4 grid), 24 codes."""
    from mmspec.training.t2i import random_janus

    return random_janus(special_ids=(BOS, PAD, BOI), sharpness=sharpness, seed=seed)


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("janus")
    tiny_janus(sharpness=4.0).save_pretrained(path)
    return path


PROMPTS = torch.tensor([[BOS, 5, 7, 9, 11, BOI], [BOS, 3, 3, 8, 2, BOI]])


def _hf_greedy(model, ids, mask, guidance_scale):
    from transformers import GenerationConfig

    config = GenerationConfig(
        bos_token_id=BOS,
        pad_token_id=PAD,
        do_sample=False,
        guidance_scale=guidance_scale,
        generation_kwargs={"boi_token_id": BOI},
    )
    return model.generate(ids, attention_mask=mask, generation_mode="image", generation_config=config)


@pytest.mark.parametrize(
    "speculative,options",
    [
        (None, None),
        ("sjd", None),
        ("mc-sjd", None),
        ("mc-sjd", {"coupling": "gumbel", "init": "copy"}),
        ("mc-sjd", {"window": "heuristic"}),
    ],
)
@pytest.mark.parametrize("guidance_scale", [2.0, 5.0])  # transformers image mode needs CFG (> 1)
def test_greedy_image_tokens_equal_transformers_generate(janus_dir, speculative, options, guidance_scale):
    pipe = JanusImagePipeline.from_pretrained(janus_dir)
    expected = _hf_greedy(pipe.model, PROMPTS, torch.ones_like(PROMPTS), guidance_scale)
    out = pipe(
        input_ids=PROMPTS,
        guidance_scale=guidance_scale,
        temperature=0,
        speculative=speculative,
        speculative_options=options,
        num_draft_tokens=4,
        output_type="tokens",
    )
    assert torch.equal(out.tokens.flatten(1), expected)
    if speculative is not None:
        assert out.stats.steps <= 15


def test_left_padded_batch_equals_transformers_generate(janus_dir):
    pipe = JanusImagePipeline.from_pretrained(janus_dir)
    ids = torch.tensor([[BOS, 5, 7, 9, 11, BOI], [PAD, PAD, BOS, 8, 2, BOI]])
    mask = (ids != PAD).long()
    expected = _hf_greedy(pipe.model, ids, mask, 3.0)
    for speculative in (None, "mc-sjd"):
        out = pipe(
            input_ids=ids,
            attention_mask=mask,
            guidance_scale=3.0,
            temperature=0,
            speculative=speculative,
            num_draft_tokens=4,
            output_type="tokens",
        )
        assert torch.equal(out.tokens.flatten(1), expected), speculative


def test_images_decode_and_relaxed_rules_read_the_codebook(janus_dir, tmp_path):
    pipe = JanusImagePipeline.from_pretrained(janus_dir)
    kw = dict(input_ids=PROMPTS, guidance_scale=3.0, speculative="mc-sjd", num_draft_tokens=4)
    out = pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="pil")
    assert len(out.images) == 2 and out.images[0].size == (8, 8) and out.tokens.shape == (2, 4, 4)
    exact = pipe(**kw, generator=torch.Generator().manual_seed(1), output_type="tokens")
    off = pipe(
        **kw,
        generator=torch.Generator().manual_seed(1),
        output_type="tokens",
        acceptance="lantern",
        acceptance_options={"delta": 0.0, "k": 4, "neighbour_cache": tmp_path},
    )
    assert torch.equal(off.tokens, exact.tokens)  # δ = 0 is exact acceptance, token for token
    on = pipe(
        **kw,
        generator=torch.Generator().manual_seed(1),
        output_type="tokens",
        acceptance="lantern",
        acceptance_options={"delta": 0.3, "k": 4, "neighbour_cache": tmp_path},
    )
    assert on.stats.summary()["max_tvd_per_token"] <= 0.3 + 1e-6


def test_mcsjd_sampling_follows_the_cfg_law_of_the_first_tokens():
    """Joint law of the first 2 image tokens under CFG, 6k samples, vs the exact law from the target."""
    import math

    from mmspec.sampling import SamplingConfig

    model = tiny_janus(seed=3)
    pipe = JanusImagePipeline(model)
    n, sampling = 6000, SamplingConfig(temperature=1.0, top_k=3, guidance_scale=2.0)
    ids = PROMPTS[:1]
    out = pipe(
        input_ids=ids.expand(n, -1),
        guidance_scale=2.0,
        top_k=3,
        speculative="mc-sjd",
        num_draft_tokens=2,
        generator=torch.Generator().manual_seed(0),
        output_type="tokens",
    )
    prompt = pipe.prompt_inputs(None, ids, None)
    target = pipe.target
    exact = {}
    cache = target.new_cache(1, 16, cfg=True)
    first = _probs(target.prefill(prompt, cache).output, sampling)
    for a in range(target.vocab_size):
        if first[a] == 0:
            continue
        c = target.new_cache(1, 16, cfg=True)
        target.prefill(prompt, c)
        second = _probs(target(torch.tensor([[a]]), c.slots(1), c), sampling)
        for b in range(target.vocab_size):
            if second[b] > 0:
                exact[(a, b)] = float(first[a] * second[b])
    assert math.isclose(sum(exact.values()), 1.0, rel_tol=1e-4)
    assert_rows_follow(out.tokens.flatten(1)[:, :2], exact)


def _probs(output, sampling):
    from mmspec.sampling import logits_to_probs

    return logits_to_probs(output.logits[0, -1], sampling, output.uncond_logits[0, -1])


def test_clear_errors(janus_dir):
    pipe = JanusImagePipeline.from_pretrained(janus_dir)
    with pytest.raises(ValueError, match="needs the pipeline's processor"):
        pipe(prompt="a cat")
    with pytest.raises(ValueError, match="must end with the begin-of-image token"):
        pipe(input_ids=torch.tensor([[BOS, 5, 7]]))
    with pytest.raises(ValueError, match="speculative='eagle' needs an EAGLE head"):
        pipe(input_ids=PROMPTS, speculative="eagle")


def tiny_processor():
    """A JanusProcessor over a word-level tokenizer built offline (left padding, as Janus's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import JanusImageProcessor, JanusProcessor, PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "a", "red", "cat", "dog", "blue"]
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({"<image_placeholder>": 60, "<unk>": 61, "<begin_of_image>": BOI, "<end_of_image>": 63})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        extra_special_tokens={
            "image_token": "<image_placeholder>",
            "boi_token": "<begin_of_image>",
            "eoi_token": "<end_of_image>",
        },
    )
    return JanusProcessor(image_processor=JanusImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)


def test_text_prompts_through_the_processor_saved_with_the_model(janus_dir, tmp_path):
    folder = tmp_path / "with-processor"
    JanusImagePipeline.from_pretrained(janus_dir).model.save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    pipe = JanusImagePipeline.from_pretrained(folder)
    assert pipe.processor is not None
    prompts = ["a red cat", "dog"]
    enc = pipe.processor(text=prompts, generation_mode="image", padding=True, return_tensors="pt")
    assert enc["input_ids"][:, -1].eq(BOI).all() and enc["attention_mask"][1, 0] == 0  # BOI appended, left padding
    expected = _hf_greedy(pipe.model, enc["input_ids"], enc["attention_mask"], 3.0)
    out = pipe(
        prompt=prompts,
        guidance_scale=3.0,
        temperature=0,
        speculative="mc-sjd",
        num_draft_tokens=4,
        output_type="tokens",
    )
    assert torch.equal(out.tokens.flatten(1), expected)
