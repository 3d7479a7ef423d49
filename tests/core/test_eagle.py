"""EAGLE / EAGLE-2 drafting and training: losslessness, feature pairing, CFG, training, save/load."""

import itertools
import json
import math
from argparse import ArgumentParser

import pytest
import torch

from mmspec.cache import StaticKVCache
from mmspec.drafters import EagleConfig, EagleDrafter, EagleHead
from mmspec.drafters.eagle import TreeConfig, target_fingerprint, tree_from_parents
from mmspec.loops import required_cache_len, speculative_generate
from mmspec.modeling import rope_frequencies
from mmspec.sampling import SamplingConfig, logits_to_probs
from mmspec.training.eagle import (
    EagleTrainConfig,
    add_train_drafter_args,
    self_distilled_batches,
    token_prompts,
    train_drafter_command,
    train_eagle_head,
)
from mmspec.tree import DraftTree
from mmspec.types import PrefillOutput, TargetOutput, TokenPrompt

from ..conftest import assert_rows_follow, recording, tiny_lm
from .test_mcsjd import SyntheticCost

PROMPTS = [[1, 2, 3, 4, 5, 1, 2, 3], [7, 8], [9, 9, 9, 9, 9]]
GREEDY = SamplingConfig(temperature=0)
TREE = TreeConfig(depth=4, top_k=3, total_nodes=10)


def new_head(target, seed=1, name="tiny"):
    torch.manual_seed(seed)
    config = EagleConfig(
        hidden_size=target.config.dim,
        n_head=target.config.n_head,
        vocab_size=target.vocab_size,
        target_name=name,
        multiple_of=16,
    )
    return EagleHead(config, target.tok_embeddings, target.output)


def train_config(**kw):
    return EagleTrainConfig(
        **{"steps": 100, "batch_size": 8, "seq_len": 24, "lr": 3e-3, "max_prompt_len": 8, "progress": False, **kw}
    )


def train_batches(target, config):
    gen = torch.Generator().manual_seed(5)
    prompts = [
        torch.randint(target.vocab_size, (int(n),), generator=gen).tolist()
        for n in torch.randint(1, 9, (64,), generator=gen)
    ]
    return self_distilled_batches(target, token_prompts(prompts, config.batch_size), config, SamplingConfig())


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture(scope="module")
def trained_head(lm):
    head = new_head(lm)
    config = train_config()
    train_eagle_head(lm, head, train_batches(lm, config), config)
    return head


def generate(target, prompt, drafter=None, k=4, sampling=GREEDY, max_new=30, seed=0, cfg=False, acceptance="exact"):
    batch = prompt.tokens.shape[0] if isinstance(prompt, TokenPrompt) else prompt.shape[0]
    width = prompt.tokens.shape[1] if isinstance(prompt, TokenPrompt) else 1
    cache = target.new_cache(batch, required_cache_len(width, max_new, 1 + TREE.total_nodes), cfg=cfg)
    return speculative_generate(
        target,
        prompt,
        cache,
        max_new_tokens=max_new,
        drafter=drafter,
        num_draft_tokens=k,
        sampling=sampling,
        acceptance=acceptance,
        generator=torch.Generator().manual_seed(seed),
    )


RecordingDrafter = recording(EagleDrafter)


def head_from_scratch(head, tokens, features):
    """Predicted feature after the last pair, one causal pass: ``tokens [1, L]`` = x_1..x_L,
    ``features [1, L, H]`` = f_0..f_{L-1}."""
    cache = head.new_cache(1, tokens.shape[1])
    slots = cache.slots(tokens.shape[1])
    return head(tokens, features, slots, cache, slots, cache.attention_mask(slots))[:, -1]


def lm_reference_qs(lm, head, sequence, drafts, sampling):
    """Draft distributions ``[k, V]`` of ``drafts`` after ``sequence`` (prompt + committed tokens),
    from scratch: target features for the committed pairs, then the head's own predictions."""
    x = torch.tensor([sequence])
    length = x.shape[1] - 1
    features = lm(x[:, :length], torch.arange(length)[None], lm.new_cache(1, length)).hidden_states
    tokens, qs = x[:, 1:], []
    for token in drafts:
        predicted = head_from_scratch(head, tokens, features)  # [1, H]
        qs.append(logits_to_probs(head.logits(predicted), sampling)[0])
        tokens = torch.cat([tokens, torch.tensor([[token]])], 1)
        features = torch.cat([features, predicted[:, None]], 1)
    return torch.stack(qs)


# ---------------------------------------------------------------------- losslessness (greedy)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("tree", [None, TREE], ids=["chain", "tree"])
@pytest.mark.parametrize("acceptance", ["greedy", "exact"])
def test_greedy_eagle_equals_greedy_baseline(lm, trained_head, batch, tree, acceptance):
    prompt = TokenPrompt.from_lists(PROMPTS[:batch])
    base = generate(lm, prompt)
    spec = generate(lm, prompt, EagleDrafter(trained_head, tree), acceptance=acceptance)
    assert torch.equal(spec.tokens, base.tokens)
    assert spec.stats.mean_accepted > 1.5 and spec.stats.steps < base.stats.steps / 2


def test_eagle_chain_survives_skipped_steps_of_a_cost_window(lm, trained_head):
    """Width 0 (no draft) interleaved with drafting: the catch-up still feeds every committed token."""
    prompt = TokenPrompt.from_lists(PROMPTS[:3])
    drafter = SyntheticCost(EagleDrafter(trained_head), slope=5.0, explore_every=6)
    assert torch.equal(generate(lm, prompt, drafter).tokens, generate(lm, prompt).tokens)
    assert 0 in drafter.widths and max(drafter.widths[1:]) >= 1


def test_training_raises_acceptance_and_resume_reproduces_weights(lm, trained_head, tmp_path):
    prompt = TokenPrompt.from_lists(PROMPTS)
    untrained = generate(lm, prompt, EagleDrafter(new_head(lm))).stats.mean_accepted
    trained = generate(lm, prompt, EagleDrafter(trained_head)).stats.mean_accepted
    assert untrained < 0.3 and trained > 2.0, (untrained, trained)

    full = new_head(lm)
    config = train_config(steps=6, seed=3)
    train_eagle_head(lm, full, train_batches(lm, config), config)

    class Interrupted(Exception):
        pass

    batches = train_batches(lm, config)

    def crashing(step):
        if step == 3:
            raise Interrupted
        return batches(step)

    first = new_head(lm)
    with pytest.raises(Interrupted):
        train_eagle_head(
            lm, first, crashing, train_config(steps=6, seed=3, checkpoint_dir=tmp_path, checkpoint_every=2)
        )
    resumed = new_head(lm, seed=99)  # a different init: resuming must load the step-2 weights
    config = train_config(steps=6, seed=3, checkpoint_dir=tmp_path, checkpoint_every=2, resume=True)
    losses = train_eagle_head(lm, resumed, train_batches(lm, config), config)
    assert len(losses) == 4
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------- feature pairing
def test_incremental_chain_drafts_equal_head_from_scratch(lm, trained_head):
    """Every draft distribution at every step (ragged rows, rollbacks) equals the head run from
    scratch over the committed pairs (f_t, x_{t+1}) -- the pairing used in training -- followed by
    the head's own predicted features for the earlier drafts."""
    sampling = SamplingConfig(temperature=1.0, top_k=20)
    drafter = RecordingDrafter(trained_head)
    generate(lm, TokenPrompt.from_lists(PROMPTS), drafter, sampling=sampling, max_new=30)
    checked = 0
    for history, lengths, num_new, draft in drafter.records:
        for row in range(len(PROMPTS)):
            if num_new[row] > 0:
                sequence = history[row, : lengths[row]].tolist()
                want = lm_reference_qs(lm, trained_head, sequence, draft.tokens[row].tolist(), sampling)
                torch.testing.assert_close(draft.draft_probs[row], want, atol=1e-5, rtol=1e-4)
                checked += 1
    assert checked > 20


def test_incremental_tree_drafts_follow_head_from_scratch(lm, trained_head):
    """After tree compaction the catch-up uses the accepted path's features, and every level runs
    at its own position over its ancestors: along the tree's first-child path each first child is
    the argmax of the head run from scratch, at every step."""
    drafter = RecordingDrafter(trained_head, TREE)
    generate(lm, TokenPrompt.from_lists(PROMPTS), drafter, max_new=20)
    checked = 0
    for history, lengths, num_new, draft in drafter.records:
        for row in range(len(PROMPTS)):
            if num_new[row] == 0:
                continue
            path, node = [], 0
            while draft.tree.children[row, node, 0] >= 0:
                node = int(draft.tree.children[row, node, 0])
                path.append(int(draft.tokens[row, node]))
            assert len(path) >= 2  # the most likely path is expanded beyond depth 1
            want = lm_reference_qs(lm, trained_head, history[row, : lengths[row]].tolist(), path, SamplingConfig())
            assert want.argmax(-1).tolist() == path
            checked += 1
    assert checked > 10


def test_tree_tensors_match_draft_tree_from_parents():
    parents = torch.tensor([[-1, 0, 0, 1, 1, 2, 3, 3], [-1, 0, 1, 2, 0, 4, 0, 1]])
    got = tree_from_parents(parents, max_depth=4, max_children=3)
    want = DraftTree.from_parents(parents)
    assert torch.equal(got.depth, want.depth) and torch.equal(got.ancestor_mask, want.ancestor_mask)
    assert (
        torch.equal(got.children[..., : want.max_children], want.children)
        and (got.children[..., want.max_children :] == -1).all()
    )


def test_eagle2_tree_structure(lm, trained_head):
    drafter = RecordingDrafter(trained_head, TREE)
    generate(lm, TokenPrompt.from_lists(PROMPTS), drafter, max_new=8)
    for _, _, _, draft in drafter.records:
        tree = draft.tree
        assert draft.tokens.shape == (3, 1 + TREE.total_nodes) and draft.draft_probs is None
        want = DraftTree.from_parents(tree.parents)  # validates topological order
        assert torch.equal(tree.ancestor_mask, want.ancestor_mask) and tree.max_depth == TREE.depth
        # no duplicate siblings (the same token twice under one parent would waste a node)
        for row in range(3):
            kids = tree.children[row][tree.children[row] >= 0].view(-1)
            pairs = set(zip(tree.parents[row, kids].tolist(), draft.tokens[row, kids].tolist()))
            assert len(pairs) == len(kids)


def test_tree_depth_must_match_num_draft_tokens(lm, trained_head):
    with pytest.raises(ValueError, match="pass num_draft_tokens=4"):
        generate(lm, TokenPrompt.from_lists(PROMPTS[:1]), EagleDrafter(trained_head, TREE), k=3)
    with pytest.raises(ValueError, match="total_nodes"):
        TreeConfig(depth=2, top_k=2, total_nodes=7)


# ---------------------------------------------------------------------- sampling (distribution)
@pytest.mark.parametrize("tree", [None, TreeConfig(depth=2, top_k=2, total_nodes=4)], ids=["chain", "tree"])
def test_exact_eagle_sampling_reproduces_target_distribution(tree):
    """Empirical joint law of the first 3 generated tokens vs the exact one, n rows in one batch.
    Tolerance: 3x the expected total-variation error of an exact sampler (shrinks as 1/sqrt(n))."""
    vocab, length, n = 5, 3, 20_000
    target = tiny_lm(vocab_size=vocab, dim=16, n_layer=1, n_head=2, seed=11, sharpness=1.5)
    sampling = SamplingConfig(temperature=0.9, top_k=4)
    prompt = [0, 1, 2, 1]
    out = generate(
        target,
        TokenPrompt.from_lists([prompt] * n),
        EagleDrafter(new_head(target, seed=4), tree),
        k=2,
        sampling=sampling,
        max_new=length,
        seed=7,
    )
    joint = {}
    for seq in itertools.product(range(vocab), repeat=length):
        tokens = torch.tensor([prompt + list(seq)])
        logits = target(tokens, torch.arange(tokens.shape[1])[None], target.new_cache(1, tokens.shape[1])).logits
        probs = logits_to_probs(logits[0, len(prompt) - 1 : -1], sampling)
        joint[seq] = math.prod(probs[i, t].item() for i, t in enumerate(seq))
    assert_rows_follow(out.tokens, joint)
    assert out.stats.mean_accepted > 0.2  # speculation actually happened (random head: about 0.3)


# ---------------------------------------------------------------------- classifier-free guidance
class LabelledLM:
    """Test-only CFG target: a token LM whose first position holds a label token; the unconditional
    half has ``null_token`` there instead (LlamaGen's ``[cond ; uncond]`` rows in a groups=2 cache).
    The prompt is the label tensor ``[B]``: a condition prefix without a following token."""

    def __init__(self, lm, null_token):
        self.lm = lm
        self.null_token = null_token
        self.vocab_size = lm.vocab_size

    def new_cache(self, batch_size, max_seq_len, cfg=False):
        c = self.lm.config
        return StaticKVCache(c.n_layer, batch_size, c.n_head, max_seq_len, c.head_dim, groups=2 if cfg else 1)

    def prefill(self, labels, cache):
        rows = torch.cat([labels, torch.full_like(labels, self.null_token)])[: cache.groups * len(labels)]
        out = self._run(rows[:, None], torch.zeros_like(labels)[:, None], cache, None)
        cache.commit(torch.ones_like(labels))
        return PrefillOutput(out, hidden_states_all=out.hidden_states)

    def forward(self, tokens, positions, cache, attn_mask):
        return self._run(tokens.repeat(cache.groups, 1), positions, cache, attn_mask)

    def _run(self, rows, positions, cache, attn_mask):
        slots = cache.slots(rows.shape[1])
        mask = cache.attention_mask(slots) if attn_mask is None else attn_mask
        freqs = rope_frequencies(positions, self.lm.config.head_dim).repeat(cache.groups, 1, 1, 1)
        h = self.lm.tok_embeddings(rows)
        for i, layer in enumerate(self.lm.layers):
            h = layer(h, freqs, cache, i, slots, mask)
        h = self.lm.norm(h)
        logits = self.lm.output(h).float()
        if cache.groups == 1:
            return TargetOutput(logits, h)
        (cond_logits, uncond_logits), (cond_h, uncond_h) = logits.chunk(2), h.chunk(2)
        return TargetOutput(cond_logits, cond_h, uncond_logits, uncond_h)


LABELS = torch.tensor([3, 11, 30])


@pytest.mark.parametrize("tree", [None, TREE], ids=["chain", "tree"])
def test_cfg_greedy_eagle_equals_cfg_greedy_baseline(lm, trained_head, tree):
    target = LabelledLM(lm, null_token=0)
    guided = SamplingConfig(temperature=0, guidance_scale=3.0)
    base = generate(target, LABELS, sampling=guided, cfg=True)
    assert not torch.equal(base.tokens, generate(target, LABELS).tokens)  # guidance matters here
    spec = generate(target, LABELS, EagleDrafter(trained_head, tree), sampling=guided, cfg=True)
    assert torch.equal(spec.tokens, base.tokens)
    assert spec.stats.mean_accepted > 1.0


def test_cfg_drafts_combine_both_halves_like_the_target(lm, trained_head):
    """Under CFG the draft distribution is logits_to_probs(cond head logits, cfg, uncond head
    logits), each half run on its own features (checked against a from-scratch computation)."""
    target = LabelledLM(lm, null_token=0)
    sampling = SamplingConfig(temperature=1.0, guidance_scale=3.0, top_p=0.95)
    drafter = RecordingDrafter(trained_head)
    generate(target, LABELS, drafter, sampling=sampling, cfg=True, max_new=12)
    checked = 0
    for history, lengths, num_new, draft in drafter.records:
        for row in range(len(LABELS)):
            if num_new[row] > 0:
                generated = history[row, : lengths[row]][None]
                halves = []
                for first in (LABELS[row], 0):  # conditional, then unconditional prefix token
                    x = torch.cat([torch.tensor([[first]]), generated[:, :-1]], 1)
                    features = lm(x, torch.arange(x.shape[1])[None], lm.new_cache(1, x.shape[1])).hidden_states
                    halves.append(trained_head.logits(head_from_scratch(trained_head, generated, features)))
                want = logits_to_probs(halves[0], sampling, halves[1])[0]
                torch.testing.assert_close(draft.draft_probs[row, 0], want, atol=1e-5, rtol=1e-4)
                checked += 1
    assert checked > 10


# ---------------------------------------------------------------------- save / load, CLI
def test_save_load_round_trip_and_wrong_target(lm, trained_head, tmp_path):
    trained_head.save_pretrained(tmp_path / "head")
    saved = json.loads((tmp_path / "head" / "config.json").read_text())
    assert saved["target_name"] == "tiny" and saved["vocab_size"] == 48 and saved["hidden_size"] == 32
    loaded = EagleHead.from_pretrained(tmp_path / "head", lm.tok_embeddings, lm.output, target_name="tiny")
    assert not any("tok_embeddings" in k or "output" in k for k in loaded.state_dict())  # target modules not stored
    for (name, a), b in zip(trained_head.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    prompt = TokenPrompt.from_lists(PROMPTS)
    assert torch.equal(
        generate(lm, prompt, EagleDrafter(loaded), sampling=SamplingConfig(), seed=2).tokens,
        generate(lm, prompt, EagleDrafter(trained_head), sampling=SamplingConfig(), seed=2).tokens,
    )
    with pytest.raises(ValueError, match="trained for target 'tiny' .* not for target 'other'"):
        EagleHead.from_pretrained(tmp_path / "head", lm.tok_embeddings, lm.output, target_name="other")
    small = tiny_lm(vocab_size=40)
    with pytest.raises(ValueError, match=r"'tiny' \(vocab 48, hidden 32\), not for target 'tiny' \(vocab 40"):
        EagleHead.from_pretrained(tmp_path / "head", small.tok_embeddings, small.output, target_name="tiny")


def test_train_drafter_command(lm, tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "lm").mkdir()
    save_file(lm.state_dict(), tmp_path / "lm" / "model.safetensors")
    (tmp_path / "lm" / "config.json").write_text(json.dumps(lm.to_dict()))
    parser = ArgumentParser()
    add_train_drafter_args(parser)
    args = parser.parse_args(
        [
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
        ]
    )
    assert train_drafter_command(args) == 0
    # The default name is a fingerprint of the target's LM head: it identifies the exact weights.
    head = EagleHead.from_pretrained(
        tmp_path / "head", lm.tok_embeddings, lm.output, target_name=target_fingerprint(lm.output)
    )
    assert head.config.hidden_size == 32
    with pytest.raises(SystemExit, match="unknown --target-kind 'vlm'"):
        train_drafter_command(parser.parse_args(["--target-kind", "vlm", "--target-path", "x", "--output", "y"]))
