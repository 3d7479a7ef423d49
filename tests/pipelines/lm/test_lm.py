"""LMPipeline over a local transformers causal-LM folder: conversion parity with transformers, greedy
speculation = baseline = transformers ``generate`` token for token, draft models cut from the target,
clear errors."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mmspec.app.bench_text import truncated_hf
from mmspec.pipelines.lm import LM_METHODS, LMPipeline, LMTarget, load_lm
from mmspec.types import TokenPrompt

PROMPTS = [[1, 2, 3, 4, 5, 1, 2, 3], [7, 8, 9, 7, 8]]


def tiny_hf(kind: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    return LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **common)).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_hf().save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_target_logits_match_transformers(kind):
    hf = tiny_hf(kind)
    target = LMTarget.from_hf(hf)
    prompt = TokenPrompt.from_lists(PROMPTS[:1])
    cache = target.new_cache(1, 32)
    pre = target.prefill(prompt, cache)
    ref = hf(prompt.tokens).logits
    torch.testing.assert_close(pre.output.logits[:, 0], ref[:, -1], atol=1e-4, rtol=1e-4)
    nxt = torch.tensor([[5, 6]])
    out = target.forward(nxt, cache.slots(2), cache, None)
    ref = hf(torch.cat([prompt.tokens, nxt], 1)).logits[:, -2:]
    torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=1e-4)


def test_greedy_methods_equal_baseline_and_transformers_generate(saved):
    hf, target = load_lm(saved)
    pipe = LMPipeline(target, tokenizer=None)
    prompt = TokenPrompt(torch.tensor([PROMPTS[0]]), torch.tensor([len(PROMPTS[0])]))
    base = pipe(prompt, max_new_tokens=20)
    ref = hf.generate(prompt.tokens, attention_mask=torch.ones_like(prompt.tokens), max_new_tokens=20, do_sample=False)
    assert base.token_ids[0].tolist() == ref[0, prompt.tokens.shape[1] :].tolist()
    configs = [
        ("ngram", {}),
        ("ngram", {"window": "heuristic"}),
        ("draft-model", {"layers": 1}),
        ("draft-model", {"layers": 2, "draft_vocab": 16, "window": "cost"}),
        ("self-draft", {}),
    ]
    for method, options in configs:
        for acceptance in ("greedy", "exact"):
            out = pipe(
                prompt, max_new_tokens=20, speculative=method, speculative_options=options, acceptance=acceptance
            )
            assert torch.equal(out.token_ids, base.token_ids), (method, options, acceptance)
    assert pipe(prompt, max_new_tokens=20, speculative="self-draft").stats.steps < base.stats.steps
    batch = TokenPrompt.from_lists(PROMPTS)
    base2 = pipe(batch, max_new_tokens=12)
    for method in ("ngram", "draft-model"):
        assert torch.equal(pipe(batch, max_new_tokens=12, speculative=method).token_ids, base2.token_ids)


def test_draft_model_cut_from_the_target_shares_weights_and_scores_its_vocabulary(saved):
    hf, target = load_lm(saved)
    draft = target.truncated(2, draft_vocab_size=16)
    assert len(draft.decoder.layers) == 2 and draft.vocab_size == 40
    shared = draft.decoder.layers[1].attention.wqkv.weight, target.decoder.layers[1].attention.wqkv.weight
    assert shared[0].data_ptr() == shared[1].data_ptr()  # the same storage, not a copy
    cache = draft.new_cache(1, 16)
    logits = draft.forward(torch.tensor([[1, 2, 3]]), cache.slots(3), cache, None).logits
    assert torch.isinf(logits[..., 16:]).all() and torch.isfinite(logits[..., :16]).all()
    # The same cut in transformers (assisted generation's assistant) computes the same full-vocabulary logits.
    full = target.truncated(2)
    cache = full.new_cache(1, 16)
    ours = full.forward(torch.tensor([[1, 2, 3]]), cache.slots(3), cache, None).logits
    torch.testing.assert_close(ours, truncated_hf(hf, 2)(torch.tensor([[1, 2, 3]])).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="1 <= layers <= 3"):
        target.truncated(4)
    with pytest.raises(ValueError, match="draft vocabulary size must be in"):
        target.truncated(1, draft_vocab_size=41)


def test_bad_inputs_are_clear_errors(saved, tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="a causal LM of one of these types is needed"):
        load_lm(tmp_path)
    pipe = LMPipeline(load_lm(saved)[1], tokenizer=None)
    with pytest.raises(ValueError, match="no tokenizer"):
        pipe("hello")
    with pytest.raises(ValueError, match="requires|needs|draft_model"):
        pipe(TokenPrompt.from_lists(PROMPTS[:1]), speculative="model")
    with pytest.raises(ValueError, match="unknown option"):
        pipe(TokenPrompt.from_lists(PROMPTS[:1]), speculative="ngram", speculative_options={"n": 2})
    assert "model" not in LM_METHODS.available(pipe) and "ngram" in LM_METHODS.available(pipe)


def test_eagle3_head_from_a_folder_is_lossless(saved, tmp_path):
    from mmspec.drafters.eagle3 import Eagle3Drafter
    from mmspec.pipelines.vlm import eagle3_head_for_vlm

    pipe = LMPipeline(load_lm(saved)[1], tokenizer=None)
    torch.manual_seed(0)
    Eagle3Drafter(eagle3_head_for_vlm(pipe.target, draft_vocab_size=16)).save_pretrained(tmp_path / "head")
    prompt = TokenPrompt.from_lists(PROMPTS)
    base = pipe(prompt, max_new_tokens=12)
    out = pipe(prompt, max_new_tokens=12, speculative="eagle3", speculative_options={"path": str(tmp_path / "head")})
    assert torch.equal(out.token_ids, base.token_ids) and out.stats.steps <= base.stats.steps
    assert "eagle3" not in LM_METHODS.available(pipe)  # needs a path
    with pytest.raises(ValueError, match="holds no drafter"):
        pipe(prompt, max_new_tokens=4, speculative="eagle3", speculative_options={"path": str(tmp_path)})
