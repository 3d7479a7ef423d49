"""EAGLE-3 heads (arXiv 2503.01840) on a tiny LM target: lossless chains and EAGLE-2 trees over a
reduced draft vocabulary, the d2t / t2d maps, aux-feature capture, training-time test, save / load."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmspec.drafters.eagle import TreeConfig
from mmspec.drafters.eagle3 import AuxFeatureTarget, Eagle3Drafter, Eagle3Head, eagle3_head_for_lm
from mmspec.loops import required_cache_len, speculative_generate
from mmspec.sampling import SamplingConfig
from mmspec.training.eagle import self_distilled_batches, token_prompts
from mmspec.training.eagle3 import (
    Eagle3TrainConfig,
    choose_draft_vocab,
    eagle3_ttt_loss,
    teacher_force,
    train_eagle3_head,
)
from mmspec.types import TokenPrompt

from ..conftest import assert_rows_follow, tiny_lm

GREEDY = SamplingConfig(temperature=0)


def _run(target, prompt, drafter=None, k=3, sampling=GREEDY, max_new=20, seed=0):
    run_target = target if drafter is None else drafter.features_target(target)
    width = 1 if drafter is None else drafter.verify_width(k)
    cache = target.new_cache(prompt.tokens.shape[0], required_cache_len(prompt.tokens.shape[1], max_new, width))
    return speculative_generate(
        run_target,
        prompt,
        cache,
        max_new_tokens=max_new,
        drafter=drafter,
        num_draft_tokens=k,
        sampling=sampling,
        generator=torch.Generator().manual_seed(seed),
    )


@pytest.fixture(scope="module")
def trained():
    """A 4-layer target and an EAGLE-3 head with a 24-of-48 draft vocabulary, trained 30 steps."""
    target = tiny_lm(n_layer=4, seed=2)
    head = eagle3_head_for_lm(target, draft_vocab_size=24)
    config = Eagle3TrainConfig(
        steps=30, batch_size=8, seq_len=12, lr=3e-3, ttt_steps=3, vocab_batches=4, progress=False
    )
    prompts = [
        [int(t) for t in torch.randint(48, (n,), generator=torch.Generator().manual_seed(n))] for n in range(1, 7)
    ]
    batches = self_distilled_batches(target, token_prompts(prompts, 8), config, SamplingConfig(temperature=0))
    losses = train_eagle3_head(target, head, batches, config)
    return target, head.eval(), losses


def test_aux_features_are_the_outputs_of_the_chosen_layers():
    target = tiny_lm(n_layer=4)
    prompt = TokenPrompt.from_lists([[1, 2, 3], [4, 5]])
    seen = {}
    hooks = [
        layer.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
        for i, layer in enumerate(target.layers)
    ]
    target.prefill(prompt, target.new_cache(2, 8))
    for h in hooks:
        h.remove()
    pre = AuxFeatureTarget(target, (0, 2, 3)).prefill(prompt, target.new_cache(2, 8))
    torch.testing.assert_close(pre.hidden_states_all, torch.cat([seen[0], seen[2], seen[3]], -1))
    torch.testing.assert_close(
        pre.output.hidden_states[1, 0], pre.hidden_states_all[1, 1]
    )  # row 1's last real position


def test_d2t_offsets_and_target_vocab_logits():
    target = tiny_lm()
    head = eagle3_head_for_lm(target, draft_vocab_size=5, aux_layer_ids=(0, 1, 1))
    ids = torch.tensor([2, 7, 8, 30, 47])
    head.set_draft_vocab(ids)
    assert head.d2t.dtype == torch.int64 and head.d2t.tolist() == [2, 6, 6, 27, 43]  # target id = i + d2t[i]
    assert head.t2d.dtype == torch.bool and head.t2d.nonzero().flatten().tolist() == ids.tolist()
    features = torch.randn(3, 32)
    full = head.logits(features)  # [3, 48]
    torch.testing.assert_close(full[:, ids], head.draft_logits(features))
    assert torch.isinf(full[:, ~head.t2d]).all()
    with pytest.raises(ValueError, match="distinct ascending"):
        head.set_draft_vocab(torch.tensor([3, 2, 1, 0, 5]))


@pytest.mark.parametrize("tree", [None, TreeConfig(depth=3, top_k=3, total_nodes=8)], ids=["chain", "tree"])
def test_greedy_speculation_equals_the_baseline_and_saves_steps(trained, tree):
    target, head, losses = trained
    assert losses[-1] < losses[0]
    prompt = TokenPrompt.from_lists([[3, 4, 5, 6], [7, 8], [1]])
    base = _run(target, prompt)
    spec = _run(target, prompt, Eagle3Drafter(head, tree))
    assert torch.equal(spec.tokens, base.tokens)
    assert spec.stats.steps < base.stats.steps and spec.stats.mean_accepted > 0.5


def test_exact_sampling_reproduces_the_target_law(trained):
    """Tokens outside the draft vocabulary have q = 0: exact acceptance stays lossless."""
    target, head, _ = trained
    n = 4000
    prompt = TokenPrompt.from_lists([[3, 4, 5]] * n)
    sampling = SamplingConfig(temperature=1.0, top_k=3)
    out = _run(target, prompt, Eagle3Drafter(head), k=2, sampling=sampling, max_new=2, seed=3)
    joint = {}
    cache = target.new_cache(1, 8)
    pre = target.prefill(TokenPrompt.from_lists([[3, 4, 5]]), cache)
    from mmspec.sampling import logits_to_probs

    p1 = logits_to_probs(pre.output.logits[0, -1], sampling)
    for a in torch.nonzero(p1).flatten().tolist():
        branch = target.new_cache(1, 8)
        branch.k.copy_(cache.k), branch.v.copy_(cache.v), branch.lengths.copy_(cache.lengths)
        p2 = logits_to_probs(target.forward(torch.tensor([[a]]), branch.slots(1), branch).logits[0, -1], sampling)
        for b in torch.nonzero(p2).flatten().tolist():
            joint[(a, b)] = float(p1[a] * p2[b])
    assert_rows_follow(out.tokens, joint)
    assert out.stats.mean_accepted > 0.1  # drafts were accepted: the test exercises acceptance


def test_training_time_test_unrolls_what_drafting_sees(trained):
    """Step j of the TTT loss at position s equals running the head's cache-based drafting j steps
    past a committed position s (same keys, same RoPE ids): its step-1 logits match."""
    target, head, _ = trained
    tokens = torch.tensor([[5, 9, 11, 3, 20, 21]])
    prompt = TokenPrompt.from_lists([[3, 4]])
    batch = teacher_force(head, target, prompt, tokens, 8)
    captured = {}
    original = head.draft_logits

    def spy(features):
        captured.setdefault(len(captured), features.detach().clone())
        return original(features)

    head.draft_logits = spy
    try:
        eagle3_ttt_loss(head, batch, ttt_steps=2, step_decay=0.8)
    finally:
        del head.draft_logits
    s = 3  # committed through position s: step 0 at s, then one draft at s + 1 with the true token
    cache = head.new_cache(1, 16)
    slots = cache.slots(s + 1)
    g = head.fuse(batch.aux[:, : s + 1])
    out0 = head(batch.next_tokens[:, : s + 1], g, slots, cache, slots, cache.attention_mask(slots))
    cache.commit(torch.tensor([s + 1]))
    slot = cache.slots(1)
    out1 = head(batch.next_tokens[:, s + 1 : s + 2], out0[:, s : s + 1], slot, cache, slot, cache.attention_mask(slot))
    torch.testing.assert_close(captured[0][:, : s + 1], out0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(captured[1][:, s], out1[:, 0], atol=1e-5, rtol=1e-5)


def test_draft_vocabulary_is_the_most_frequent_tokens():
    target = tiny_lm()
    head = eagle3_head_for_lm(target, draft_vocab_size=4, aux_layer_ids=(0, 1, 1))
    data = {
        0: (TokenPrompt.from_lists([[9, 9, 9, 1]]), torch.tensor([[9, 5, 5, 40, -1]])),
        1: (TokenPrompt.from_lists([[40]]), torch.tensor([[5, 40, 2, 2, 2]])),
    }
    chosen = choose_draft_vocab(head, data.__getitem__, 2)  # counts: 9:3, 5:3, 40:3, 2:3, 1:1
    assert chosen.tolist() == [2, 5, 9, 40]


def test_save_load_round_trip_and_wrong_target(tmp_path, trained):
    target, head, _ = trained
    drafter = Eagle3Drafter(head, TreeConfig(3, 2, 5))
    drafter.save_pretrained(tmp_path)
    loaded = Eagle3Drafter.from_pretrained(tmp_path, target)
    assert loaded.tree == drafter.tree and torch.equal(loaded.head.d2t, head.d2t)
    for name, value in head.state_dict().items():
        assert torch.equal(value, loaded.head.state_dict()[name]), name
    with pytest.raises(ValueError, match="was trained for target"):
        Eagle3Drafter.from_pretrained(tmp_path, tiny_lm(n_layer=4, seed=9))
    # Weights of another shape under the right config: a ValueError naming the head, folder and key.
    weights = load_file(tmp_path / "model.safetensors")
    weights["fc.weight"] = weights["fc.weight"][:, :-1].contiguous()
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"the weights of the EAGLE-3 head in .* do not match its config .*fc\.weight"):
        Eagle3Drafter.from_pretrained(tmp_path, target)
    with pytest.raises(ValueError, match="was trained for target"):
        Eagle3Drafter(head).features_target(tiny_lm(n_layer=4, seed=9))
    with pytest.raises(ValueError, match="concatenation of three target layers"):
        head.fuse(torch.zeros(1, 1, 32))  # the target's last feature instead of [l ; m ; h]
    with pytest.raises(ValueError, match="do not exist in a target with 4 layers"):
        AuxFeatureTarget(target, (0, 1, 4))
    with pytest.raises(ValueError, match="must name layers of the target"):
        eagle3_head_for_lm(target, aux_layer_ids=(0, 1, 9))
    assert isinstance(loaded.head, Eagle3Head)


def test_train_drafter_arch_eagle3_for_an_lm(tmp_path):
    import json

    from mmspec.app.cli import main

    target = tiny_lm(n_layer=4)
    (tmp_path / "lm").mkdir()
    save_file(target.state_dict(), tmp_path / "lm" / "model.safetensors")
    (tmp_path / "lm" / "config.json").write_text(json.dumps(target.to_dict()))
    assert (
        main(
            [
                "train-drafter",
                "--arch",
                "eagle3",
                "--target-path",
                str(tmp_path / "lm"),
                "--output",
                str(tmp_path / "head"),
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--seq-len",
                "4",
                "--draft-vocab-size",
                "16",
                "--aux-layers",
                "0,1,3",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    drafter = Eagle3Drafter.from_pretrained(tmp_path / "head", target)
    assert drafter.head.config.aux_layer_ids == (0, 1, 3) and int(drafter.head.t2d.sum()) == 16
    prompt = TokenPrompt.from_lists([[1, 2, 3]])
    assert torch.equal(_run(target, prompt, drafter).tokens, _run(target, prompt).tokens)


def test_lm_head_warm_start_from_the_target():
    from mmspec.training.eagle3 import init_from_target

    target = tiny_lm(n_layer=4)
    head = eagle3_head_for_lm(target, draft_vocab_size=6)
    head.set_draft_vocab(torch.tensor([1, 4, 9, 16, 25, 36]))
    init_from_target(head, target)
    torch.testing.assert_close(head.lm_head.weight, target.output.weight[[1, 4, 9, 16, 25, 36]])
    torch.testing.assert_close(head.norm.weight, target.norm.weight)
