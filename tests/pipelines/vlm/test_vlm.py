"""VLM targets and VLMPipeline on tiny random LLaVA-1.5, LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL models.

References are transformers itself: the converted decoder must reproduce the HF model's logits, and
greedy decoding (baseline and speculative) must reproduce ``model.generate`` token for token.
"""

from __future__ import annotations

import functools

import numpy as np
import PIL.Image
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    BatchFeature,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from mmspec.drafters import ModelDrafter, NGramDrafter
from mmspec.loops import required_cache_len, speculative_generate
from mmspec.pipelines.vlm import VLMPipeline, VLMPipelineOutput, VLMPrompt, load_vlm_target
from mmspec.sampling import SamplingConfig, logits_to_probs

from ...conftest import assert_rows_follow, noisy_copy

VOCAB = 96
SPECIALS = [
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "<image>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|im_start|>",
    "<|im_end|>",
]
WORDS = "USER: ASSISTANT: user assistant describe the image what is in this picture compare these two a cat".split()
PAD, EOS, IMAGE, IMAGE_PAD, VIDEO_PAD, VISION_START = 0, 2, 4, 5, 6, 7
LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|> <|image_pad|> <|vision_end|> {% else %}{{ c['text'] }} {% endif %}{% endfor %}<|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant{% endif %}"
)
GREEDY = SamplingConfig(temperature=0)


# --------------------------------------------------------------------------- tiny components


def tiny_tokenizer(chat_template: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with exactly ``VOCAB`` ids (so every generated id decodes)."""
    words = SPECIALS + WORDS + [f"w{i}" for i in range(VOCAB - len(SPECIALS) - len(WORDS))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=SPECIALS[4:],
        padding_side="left",  # left, as HF generation wants
    )
    tokenizer.chat_template = chat_template
    return tokenizer


class TinyQwenProcessor:
    """Stands in for ``Qwen2VLProcessor``, whose constructor insists on a video processor that needs
    torchvision (absent on CPU CI). Same interface and output as the real one for images: the
    chat template, ``<|image_pad|>`` expanded to one token per merged patch, ``mm_token_type_ids``."""

    def __init__(self, image_processor: Qwen2VLImageProcessorPil, tokenizer: PreTrainedTokenizerFast) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = tokenizer.chat_template

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=tokenize
        )

    def __call__(self, images=None, text=None, return_tensors: str = "pt", padding: bool = True) -> BatchFeature:
        data = {}
        texts = list(text)
        if images:
            data.update(self.image_processor(images=images, return_tensors="pt"))
            counts = iter((data["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2).tolist())
            placeholder = "<|image_pad|>"
            for i, t in enumerate(texts):
                parts = t.split(placeholder)
                texts[i] = parts[0] + "".join(placeholder * next(counts) + rest for rest in parts[1:])
        data.update(self.tokenizer(texts, padding=padding, return_tensors=return_tensors))
        data["mm_token_type_ids"] = (data["input_ids"] == IMAGE_PAD).int()
        return BatchFeature(data)


def _text_config(**extra) -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        eos_token_id=EOS,
        bos_token_id=1,
        pad_token_id=PAD,
        **extra,
    )


def _randomize(model: torch.nn.Module, sharpness: float, seed: int) -> None:
    """Unit-scale random weights everywhere (HF's 0.02 init makes images nearly invisible and the
    logits flat) and sharp logits (greedy decisions far from ties, like a trained model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        # Sharpen through the final norm, not the LM head: tied models share it with the embedding.
        model.model.language_model.norm.weight.mul_(sharpness)


def _llava():
    config = LlavaConfig(
        text_config=dict(model_type="llama", attention_bias=True, **_text_config()),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
        ),
        image_token_index=IMAGE,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
    )
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=tiny_tokenizer(LLAVA_TEMPLATE),
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    return model, processor


def _llava_next():
    pinpoints = [[16, 32], [32, 16]]
    config = LlavaNextConfig(
        text_config=dict(model_type="mistral", sliding_window=None, **_text_config()),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
        ),
        image_token_index=IMAGE,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
    )
    model = LlavaNextForConditionalGeneration(config)
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_grid_pinpoints=pinpoints
        ),
        tokenizer=tiny_tokenizer(LLAVA_TEMPLATE),
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    return model, processor


_QWEN_TEXT = _text_config(rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0})
_QWEN_IDS = dict(image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START)


def _qwen_processor() -> TinyQwenProcessor:
    images = Qwen2VLImageProcessorPil(
        min_pixels=8 * 8 * 4, max_pixels=16 * 16 * 4, patch_size=4, merge_size=2, temporal_patch_size=2
    )
    return TinyQwenProcessor(images, tiny_tokenizer(QWEN_TEMPLATE))


def _qwen2_vl():
    config = Qwen2VLConfig(
        text_config=_QWEN_TEXT,
        tie_word_embeddings=False,
        **_QWEN_IDS,
        vision_config=dict(
            depth=2,
            embed_dim=16,
            hidden_size=32,
            num_heads=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
    )
    return Qwen2VLForConditionalGeneration(config), _qwen_processor()


def _qwen2_5_vl():
    config = Qwen2_5_VLConfig(
        text_config=_QWEN_TEXT,
        tie_word_embeddings=True,
        **_QWEN_IDS,
        vision_config=dict(
            depth=2,
            hidden_size=16,
            intermediate_size=32,
            out_hidden_size=32,
            num_heads=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=16,
            fullatt_block_indexes=[1],
        ),
    )
    return Qwen2_5_VLForConditionalGeneration(config), _qwen_processor()


BUILDERS = {"llava": _llava, "llava_next": _llava_next, "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl}
FAMILIES = sorted(BUILDERS)


@functools.cache
def tiny_vlm(family: str, sharpness: float = 6.0, seed: int = 0):
    """``(hf_model, processor)``: shared across tests (read-only)."""
    torch.manual_seed(seed)
    model, processor = BUILDERS[family]()
    _randomize(model, sharpness, seed)
    model.generation_config.eos_token_id = [3, EOS]  # two end ids; the loop stops at 3, the pipeline cuts at 2
    model.generation_config.pad_token_id = PAD
    return model.eval(), processor


@functools.cache
def tiny_pipeline(family: str) -> VLMPipeline:
    model, processor = tiny_vlm(family)
    return VLMPipeline(load_vlm_target(model), processor)


noisy_decoder = noisy_copy  # the converted VLM decoder is a decoder like any other


def image(seed: int, size: tuple[int, int] = (20, 24)) -> PIL.Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


CASES = {  # name -> (images per prompt, prompts)
    "single": ([image(0)], ["describe the image"]),
    "multi": ([[image(1), image(2, (24, 16))]], ["what is in this image"]),
    "batch": ([image(3), [image(4, (16, 28)), image(5)]], ["what is in this picture", "a cat"]),
}


def hf_greedy(family: str, images, prompt: str, max_new_tokens: int) -> list[int]:
    """``model.generate(do_sample=False)`` on one unpadded prompt, cut after the first end id."""
    model, processor = tiny_vlm(family)
    pipe = tiny_pipeline(family)
    batch = pipe.processor(
        images=images or None, text=[_chat(processor, images, prompt)], return_tensors="pt", padding=True
    )
    out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens)
    reply = out[0, batch["input_ids"].shape[1] :].tolist()
    ends = [i for i, t in enumerate(reply) if t in (EOS, 3)]
    return reply[: ends[0] + 1] if ends else reply


def _chat(processor, images, prompt: str) -> str:
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def _rows(images_per_prompt) -> list[list]:
    return [entry if isinstance(entry, list) else [entry] for entry in images_per_prompt]


def run_loop(target, prompt: VLMPrompt, drafter=None, k: int = 3, sampling=GREEDY, max_new: int = 16, seed: int = 0):
    """``speculative_generate`` with a cache wide enough for chains and 2-wide trees."""
    cache = target.new_cache(prompt.tokens.shape[0], required_cache_len(prompt.tokens.shape[1], max_new, 2 * k + 1))
    return speculative_generate(
        target,
        target.encode_images(prompt),
        cache,
        max_new_tokens=max_new,
        drafter=drafter,
        num_draft_tokens=k,
        sampling=sampling,
        generator=torch.Generator().manual_seed(seed),
    )


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_decoder_matches_hf_logits(family):
    """Teacher-forced: every prompt position (prefill) and three appended tokens (verify forward)
    of a ragged 2-row batch give HF's logits within 1e-4."""
    model, _ = tiny_vlm(family)
    pipe = tiny_pipeline(family)
    images, prompts = CASES["batch"]
    prompt = pipe.build_prompt(images, prompts)
    extra = torch.tensor([[20, 21, 22], [23, 24, 25]])
    cache = pipe.target.new_cache(2, 128)
    pre = pipe.target.prefill(prompt, cache)
    prompt_logits = pipe.target.decoder.output(pre.hidden_states_all).float()  # [B, P, V]
    more = pipe.target.forward(extra, cache.slots(3), cache, None).logits  # [B, 3, V]
    for row, image_list in enumerate(_rows(images)):
        batch = pipe.processor(
            images=image_list, text=[_chat(pipe.processor, image_list, prompts[row])], return_tensors="pt", padding=True
        )
        n = int(prompt.lengths[row])
        assert torch.equal(batch["input_ids"][0], prompt.tokens[row, :n])  # right padding kept each row intact
        ids = torch.cat([batch["input_ids"], extra[row : row + 1]], 1)
        inputs = {**batch, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if "mm_token_type_ids" in batch:
            inputs["mm_token_type_ids"] = (ids == IMAGE_PAD).int()
        ref = model(**inputs).logits[0]  # [n + 3, V]
        torch.testing.assert_close(prompt_logits[row, :n], ref[:n], atol=1e-4, rtol=0)
        torch.testing.assert_close(more[row], ref[n:], atol=1e-4, rtol=0)
    assert (prompt.tokens == pipe.target.image_token_id).sum() >= 18  # the images really are in the prompt


def test_images_change_the_answer():
    """Guards the tests' tiny models: image features are large enough to steer the logits."""
    pipe = tiny_pipeline("llava")
    a = pipe.target.prefill(pipe.build_prompt(image(0), "describe the image"), pipe.target.new_cache(1, 64))
    b = pipe.target.prefill(pipe.build_prompt(image(9), "describe the image"), pipe.target.new_cache(1, 64))
    assert (a.output.logits - b.output.logits).abs().max() > 0.5


def test_left_padded_processor_output_becomes_right_padded():
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    prompt = VLMPrompt.from_processor({"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": ids == 6})
    assert prompt.tokens.tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]] and prompt.lengths.tolist() == [3, 5]
    assert prompt.mm_token_type_ids.tolist()[0] == [False, True, False, False, False]


# --------------------------------------------------------------------------- greedy equivalence


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_baseline_matches_hf_generate(family, case):
    """The pipeline's baseline (speculative_generate, no drafter) == model.generate per prompt."""
    images, prompts = CASES[case]
    single = case != "batch"
    out = tiny_pipeline(family)(
        images[0] if single else images, prompts[0] if single else prompts, max_new_tokens=12, num_draft_tokens=0
    )
    assert out.lengths.min() >= 3 and out.stats.mean_accepted == 0  # a reply, not an immediate end
    for row, image_list in enumerate(_rows(images)):
        expected = hf_greedy(family, image_list, prompts[row], 12)
        n = int(out.lengths[row])
        assert out.token_ids[row, :n].tolist() == expected, (family, case, row)
        assert (out.token_ids[row, n:] == PAD).all() and (out.stats.token_source[row, n:] == -1).all()
        assert out.text[row] == tiny_pipeline(family).processor.tokenizer.decode(expected, skip_special_tokens=True)


DRAFTERS = {
    "ngram": lambda target: NGramDrafter(target.vocab_size),
    "model-chain": lambda target: ModelDrafter(target.with_decoder(noisy_decoder(target.decoder, 0.05))),
    "model-tree": lambda target: ModelDrafter(
        target.with_decoder(noisy_decoder(target.decoder, 0.05)), num_alternatives=2
    ),
}


@pytest.mark.parametrize("drafter", sorted(DRAFTERS))
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_speculation_matches_baseline(family, drafter):
    """Chains and trees (M-RoPE tree nodes at depth d: text position + the row's offset) on a
    ragged batch reproduce the baseline token for token."""
    pipe = tiny_pipeline(family)
    images, prompts = CASES["batch"]
    prompt = pipe.build_prompt(images, prompts)
    base = run_loop(pipe.target, prompt, max_new=20)
    spec = run_loop(pipe.target, prompt, DRAFTERS[drafter](pipe.target), max_new=20)
    assert torch.equal(spec.tokens, base.tokens)
    if drafter != "ngram":  # a close drafter must actually save target forwards
        assert spec.stats.steps < base.stats.steps and spec.stats.mean_accepted > 0.5


def test_draft_vlm_with_a_reduced_vocabulary_scores_only_its_ids_and_is_lossless():
    """``with_draft_vocab``: the draft's logits are the full head's on its ids and -inf elsewhere, a
    draft that cannot propose some of the reply's tokens still reproduces the baseline."""
    pipe = tiny_pipeline("llava")
    images, prompts = CASES["batch"]
    prompt = pipe.build_prompt(images, prompts)
    base = run_loop(pipe.target, prompt, max_new=20)
    used = sorted(set(base.tokens[base.tokens >= 0].tolist()))
    ids = used[1:]  # the draft can never propose the reply's first-listed token
    draft = pipe.target.with_decoder(noisy_decoder(pipe.target.decoder, 0.05))
    reduced = draft.with_draft_vocab(ids)
    assert reduced.decoder is draft.decoder  # weights shared
    encoded = draft.encode_images(prompt)
    full_logits = draft.prefill(encoded, draft.new_cache(2, 64)).output.logits  # [B, 1, V]
    logits = reduced.prefill(encoded, reduced.new_cache(2, 64)).output.logits
    torch.testing.assert_close(logits[..., ids], full_logits[..., ids])  # a smaller matmul: rounding only
    outside = torch.ones(pipe.target.vocab_size, dtype=torch.bool)
    outside[ids] = False
    assert torch.isneginf(logits[..., outside]).all()
    spec = run_loop(pipe.target, prompt, ModelDrafter(reduced), max_new=20)
    assert torch.equal(spec.tokens, base.tokens) and spec.stats.mean_accepted > 0.5
    for bad in ([], [pipe.target.vocab_size], [1, 1]):
        with pytest.raises(ValueError, match="draft_vocab"):
            draft.with_draft_vocab(bad)


def test_pipeline_speculation_returns_the_baseline_text():
    pipe = tiny_pipeline("qwen2_vl")
    images, prompts = CASES["batch"]
    drafter = ModelDrafter(pipe.target.with_decoder(noisy_decoder(pipe.target.decoder, 0.05)))
    base = pipe(images, prompts, max_new_tokens=16, num_draft_tokens=0)
    spec = VLMPipeline(pipe.target, pipe.processor, drafter=drafter)(
        images, prompts, max_new_tokens=16, num_draft_tokens=3
    )
    assert spec.text == base.text and torch.equal(spec.token_ids, base.token_ids)
    assert spec.stats.steps < base.stats.steps
    text, token_ids, lengths, stats = pipe(images, prompts, max_new_tokens=16, num_draft_tokens=0, return_dict=False)
    assert text == base.text and torch.equal(lengths, base.lengths)


# --------------------------------------------------------------------------- sampling


def _exact_joint(target, prompt: VLMPrompt, length: int, sampling: SamplingConfig) -> dict[tuple, float]:
    """Exact law of the first ``length`` generated tokens, enumerated over the top-k support."""
    joint = {}

    def expand(prefix: tuple, prob: float, cache, logits) -> None:
        probs = logits_to_probs(logits, sampling)
        for token in torch.nonzero(probs > 0).flatten().tolist():
            p = prob * probs[token].item()
            if len(prefix) + 1 == length:
                joint[prefix + (token,)] = p
                continue
            branch = target.new_cache(1, cache.max_seq_len)
            branch.k.copy_(cache.k), branch.v.copy_(cache.v), branch.lengths.copy_(cache.lengths)
            branch.rope_offsets.copy_(cache.rope_offsets)
            out = target.forward(torch.tensor([[token]]), branch.slots(1), branch, None)
            branch.commit(torch.ones(1, dtype=torch.long))
            expand(prefix + (token,), p, branch, out.logits[0, -1])

    cache = target.new_cache(1, prompt.tokens.shape[1] + length + 1)
    pre = target.prefill(prompt, cache)
    expand((), 1.0, cache, pre.output.logits[0, -1])
    return joint


@pytest.mark.parametrize("reduced", [False, True])
def test_exact_speculative_sampling_reproduces_target_distribution(reduced):
    """LLaVA, a model drafter (``reduced``: scoring the even ids only, so odd tokens come from the
    rule's residual draws), exact acceptance: the empirical joint law of the first 3 tokens over
    3000 rows stays within 3x the expected total-variation error of an exact sampler."""
    model, processor = tiny_vlm("llava", sharpness=1.0, seed=3)
    target = load_vlm_target(model)
    one = target.encode_images(VLMPipeline(target, processor).build_prompt(image(0), "describe the image"))
    n, length = 3000, 3
    sampling = SamplingConfig(temperature=1.0, top_k=3)
    batch = VLMPrompt(
        tokens=one.tokens.expand(n, -1), lengths=one.lengths.expand(n), image_features=one.image_features.repeat(n, 1)
    )
    draft = target.with_decoder(noisy_decoder(target.decoder, 0.2, seed=5))
    drafter = ModelDrafter(draft.with_draft_vocab(list(range(0, VOCAB, 2))) if reduced else draft)
    out = run_loop(target, batch, drafter, k=2, sampling=sampling, max_new=length, seed=7)
    exact = _exact_joint(target, one, length, sampling)
    assert sum(exact.values()) == pytest.approx(1.0, abs=1e-5) and len(exact) == 27
    assert_rows_follow(out.tokens, exact)
    assert out.stats.mean_accepted > (0.2 if reduced else 0.5)  # speculation actually happened


# --------------------------------------------------------------------------- pipeline behaviour


@pytest.mark.parametrize("speculate", [False, True])
def test_stream_yields_the_reply_piece_by_piece(speculate):
    pipe = tiny_pipeline("llava")
    drafter = NGramDrafter(pipe.target.vocab_size) if speculate else None
    full = pipe(image(0), "describe the image", max_new_tokens=12, drafter=drafter)
    stream = pipe(image(0), "describe the image", max_new_tokens=12, drafter=drafter, stream=True)
    pieces = []
    while True:
        try:
            pieces.append(next(stream))
        except StopIteration as stop:
            result = stop.value
            break
    assert "".join(pieces) == full.text[0] and len(pieces) > 1
    assert isinstance(result, VLMPipelineOutput) and torch.equal(result.token_ids, full.token_ids)


def test_closing_a_stream_stops_generation():
    stream = tiny_pipeline("llava")(image(0), "describe the image", max_new_tokens=200, stream=True)
    next(stream)
    stream.close()  # joins the worker: it must stop at its next step, not run 200 tokens


def test_save_and_load_round_trip(tmp_path):
    model, processor = tiny_vlm("llava")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = VLMPipeline.from_pretrained(tmp_path)
    assert loaded.target.encoder.language_model is None  # the HF copy of the language model is released
    expected = tiny_pipeline("llava")(image(0), "describe the image", max_new_tokens=10)
    got = loaded(image(0), "describe the image", max_new_tokens=10)
    assert got.text == expected.text and torch.equal(got.token_ids, expected.token_ids)


def test_preprocessed_prompt_is_accepted():
    pipe = tiny_pipeline("qwen2_5_vl")
    prompt = pipe.build_prompt(image(0), "describe the image")
    assert torch.equal(
        pipe(None, prompt, max_new_tokens=8).token_ids, pipe(image(0), "describe the image", max_new_tokens=8).token_ids
    )
    with pytest.raises(ValueError, match="images=None"):
        pipe(image(0), prompt)


# --------------------------------------------------------------------------- errors


def test_unsupported_architecture_is_refused(tmp_path):
    llama = LlamaForCausalLM(LlamaConfig(**_text_config()))
    with pytest.raises(
        ValueError, match="unsupported VLM architecture 'llama'.*llava, llava_next, qwen2_5_vl, qwen2_vl"
    ):
        load_vlm_target(llama)
    llama.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported VLM architecture 'llama'"):
        load_vlm_target(tmp_path)


def test_unreadable_images_are_named(tmp_path):
    pipe = tiny_pipeline("llava")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(ValueError, match="cannot read .*broken.png"):
        pipe(str(broken), "describe the image")
    truncated = tmp_path / "truncated.png"
    image(0).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(ValueError, match="cannot read .*truncated.png"):
        pipe([image(0), truncated], "compare these two")
    with pytest.raises(ValueError, match="cannot read .*missing.jpg"):
        pipe(tmp_path / "missing.jpg", "describe the image")


def test_mismatched_inputs_raise():
    pipe = tiny_pipeline("llava")
    with pytest.raises(ValueError, match="draft vocabulary size 50 does not match target vocabulary size 96"):
        pipe(image(0), "describe the image", drafter=NGramDrafter(50))
    with pytest.raises(ValueError, match="2 prompts but 1 image entries"):
        pipe([image(0)], ["a", "b"])
    prompt = pipe.build_prompt(image(0), "describe the image")
    with pytest.raises(ValueError, match="image tokens but the images give 0 features"):
        pipe(None, VLMPrompt(tokens=prompt.tokens, lengths=prompt.lengths))
