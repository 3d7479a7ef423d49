"""Issue 16, part A: the VLM pipeline against transformers (``processor(...)`` + ``model.generate``)
on tiny random LLaVA-1.5, LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL models, where it used to differ:

1. transparent images (processors composite alpha onto white);
2. a separate, smaller or wider draft VLM of the same family (it must encode the image itself);
3. ``repetition_penalty`` from the checkpoint's ``generation_config``.
"""

from __future__ import annotations

import copy
import functools
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

from mmspec.drafters import ModelDrafter
from mmspec.pipelines.vlm import VLMPipeline, load_vlm_target, share_vision_modules

from .test_vlm import EOS, FAMILIES, IMAGE_PAD, _chat, _randomize, image, noisy_decoder, tiny_vlm


def _hf_generate(model, processor, images, prompt: str, max_new_tokens: int, **inputs_extra) -> list[int]:
    batch = processor(images=images or None, text=[_chat(processor, images, prompt)], return_tensors="pt", padding=True)
    out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens)
    reply = out[0, batch["input_ids"].shape[1] :].tolist()
    ends = [i for i, t in enumerate(reply) if t in (EOS, 3)]
    return reply[: ends[0] + 1] if ends else reply


def _reply(out) -> list[int]:
    return out.token_ids[0, : int(out.lengths[0])].tolist()


# --------------------------------------------------------------------------- 1. transparency


def transparent_images() -> dict[str, PIL.Image.Image]:
    """RGBA / LA / P-with-transparency images whose fully transparent pixels hide random colours
    (what ``convert("RGB")`` would expose)."""
    rng = np.random.RandomState(11)
    rgb = rng.randint(0, 256, (20, 24, 3), dtype=np.uint8)
    alpha = np.where(rng.rand(20, 24) < 0.4, 0, rng.randint(0, 256, (20, 24))).astype(np.uint8)
    rgba = PIL.Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    la = PIL.Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA")
    palette = PIL.Image.fromarray(rgb).quantize(16)
    palette.info["transparency"] = 3  # palette entry 3 is transparent
    return {"RGBA": rgba, "LA": la, "P": palette}


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
@pytest.mark.parametrize("family", FAMILIES)
def test_transparent_images_match_the_processor_and_generate(family, mode):
    model, processor = tiny_vlm(family)
    pipe = VLMPipeline(load_vlm_target(model), processor)
    picture = transparent_images()[mode]
    ours = pipe.build_prompt(picture, "describe the image").pixel_values
    theirs = processor(images=[picture], text=[_chat(processor, [picture], "x")], return_tensors="pt")["pixel_values"]
    stripped = processor(images=[picture.convert("RGB")], text=[_chat(processor, [picture], "x")], return_tensors="pt")[
        "pixel_values"
    ]
    if mode != "P":  # the test image really tells the two conversions apart
        assert not torch.equal(stripped, theirs)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    got = _reply(pipe(picture, "describe the image", max_new_tokens=10, num_draft_tokens=0))
    assert got == _hf_generate(model, processor, [picture], "describe the image", 10)


# --------------------------------------------------------------------------- 2. a separate draft VLM


def _resized(family: str, hidden: int, heads: int, seed: int):
    """The family's tiny model with another language-model width (and its own random vision tower
    and projector, whose output has that width)."""
    base, processor = tiny_vlm(family)
    config = copy.deepcopy(base.config)
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_attention_heads = hidden, 2 * hidden, heads
    text.head_dim = hidden // heads  # 8 for every size: the M-RoPE split [2, 1, 1] stays valid
    if family == "qwen2_vl":
        config.vision_config.hidden_size = hidden
    elif family == "qwen2_5_vl":
        config.vision_config.out_hidden_size = hidden
    torch.manual_seed(seed)
    model = type(base)(config)
    _randomize(model, 6.0, seed)
    model.generation_config = copy.deepcopy(base.generation_config)
    return model.eval(), processor


class _Recorder:
    """A drafter wrapper keeping every proposal."""

    def __init__(self, inner) -> None:
        self.inner, self.drafts = inner, []
        self.vocab_size = inner.vocab_size

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def draft(self, ctx, k, generator):
        out = self.inner.draft(ctx, k, generator)
        self.drafts.append(out.tokens.clone())
        return out


@pytest.mark.parametrize("hidden,heads", [(16, 2), (48, 6)], ids=["narrower", "wider"])
@pytest.mark.parametrize("family", FAMILIES)
def test_draft_vlm_encodes_the_image_with_its_own_tower(family, hidden, heads):
    """The first proposal equals the draft VLM's own greedy continuation (``model.generate`` of the
    draft model on the prompt + the target's first token); the output stays the target's."""
    target_model, processor = tiny_vlm(family)
    draft_model, _ = _resized(family, hidden, heads, seed=5)
    pipe = VLMPipeline(load_vlm_target(target_model), processor)
    drafter = _Recorder(ModelDrafter(load_vlm_target(draft_model)))
    picture, question, k = image(0), "describe the image", 3
    out = pipe(picture, question, max_new_tokens=12, drafter=drafter, num_draft_tokens=k)
    expected = _hf_generate(target_model, processor, [picture], question, 12)
    assert _reply(out) == expected  # lossless either way
    # The draft model's own greedy continuation after the target's first token.
    batch = processor(images=[picture], text=[_chat(processor, [picture], question)], return_tensors="pt")
    ids = torch.cat([batch["input_ids"], torch.tensor([[expected[0]]])], 1)
    inputs = {**batch, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "mm_token_type_ids" in batch:
        inputs["mm_token_type_ids"] = (ids == IMAGE_PAD).int()
    own = draft_model.generate(**inputs, do_sample=False, max_new_tokens=k)[0, ids.shape[1] :].tolist()
    assert drafter.drafts[0][0, : len(own)].tolist() == own  # (generate stops early at an end id)


def test_draft_features_from_another_tower_are_refused_with_a_clear_error():
    target_model, processor = tiny_vlm("llava")
    draft = load_vlm_target(_resized("llava", 16, 2, seed=5)[0])
    prompt = load_vlm_target(target_model).encode_images(VLMPipeline(draft, processor).build_prompt(image(0), "a cat"))
    stray = type(prompt)(tokens=prompt.tokens, lengths=prompt.lengths, image_features=prompt.image_features)
    with pytest.raises(ValueError, match="image features have width 32 but this language model's embeddings have 16"):
        draft.prefill(stray, draft.new_cache(1, 64))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_draft_with_the_targets_vision_weights_shares_its_encoding(family):
    """``share_vision_modules``: a draft whose vision weights equal the target's uses the target's
    modules, so the target's image features serve it unchanged (no second encoding) and generation
    is the same; a draft with its own vision weights keeps encoding for itself."""
    model, processor = tiny_vlm(family)
    target = load_vlm_target(model)
    twin = load_vlm_target(copy.deepcopy(model)).with_decoder(noisy_decoder(target.decoder, 0.05))
    prompt = target.encode_images(VLMPipeline(target, processor).build_prompt(image(0), "describe the image"))
    assert twin.encode_images(prompt) is not prompt  # its own modules: encodes again
    pipe = VLMPipeline(target, processor)
    before = pipe(image(0), "describe the image", max_new_tokens=10, drafter=ModelDrafter(twin), num_draft_tokens=3)
    assert share_vision_modules(twin, target) and twin.vision_modules() == target.vision_modules()
    assert twin.encode_images(prompt) is prompt  # the target's features, reused as they are
    after = pipe(image(0), "describe the image", max_new_tokens=10, drafter=ModelDrafter(twin), num_draft_tokens=3)
    assert torch.equal(after.token_ids, before.token_ids) and after.stats.steps == before.stats.steps
    other = load_vlm_target(_resized(family, 16, 2, seed=5)[0])
    assert not share_vision_modules(other, target) and other.vision_modules() != target.vision_modules()


# --------------------------------------------------------------------------- 3. generation config


@functools.cache
def _penalized(family: str, penalty: float):
    model, processor = tiny_vlm(family)
    model = copy.deepcopy(model)
    model.generation_config.repetition_penalty = penalty
    return model, processor


@pytest.mark.parametrize("family", FAMILIES)
def test_repetition_penalty_from_generation_config_matches_generate(family):
    model, processor = _penalized(family, 3.0)
    pipe = VLMPipeline(load_vlm_target(model), processor)
    assert pipe.target.generation_defaults == {"repetition_penalty": 3.0}
    question = "describe the image"
    for seed in range(6):  # the first image whose reply the penalty changes: the comparison means something
        picture = image(seed)
        expected = _hf_generate(model, processor, [picture], question, 16)
        plain = _reply(pipe(picture, question, max_new_tokens=16, num_draft_tokens=0, repetition_penalty=1.0))
        if plain != expected:
            break
    assert plain != expected
    assert _reply(pipe(picture, question, max_new_tokens=16, num_draft_tokens=0)) == expected
    for width in (1, 2):  # chains and trees: drafts are penalised along their own path
        drafter = ModelDrafter(
            pipe.target.with_decoder(noisy_decoder(pipe.target.decoder, 0.05)), num_alternatives=width
        )
        spec = pipe(picture, question, max_new_tokens=16, drafter=drafter, num_draft_tokens=3)
        assert _reply(spec) == expected and spec.stats.mean_accepted > 0.5


def test_unsupported_generation_fields_warn():
    model, _ = tiny_vlm("llava")
    model = copy.deepcopy(model)
    model.generation_config.no_repeat_ngram_size = 3
    with pytest.warns(UserWarning, match="no_repeat_ngram_size=3, which mmspec does not implement"):
        load_vlm_target(model)
    model.generation_config.no_repeat_ngram_size = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_vlm_target(model)
