import pytest
import torch

from mmspec.cache import StaticKVCache
from mmspec.loops import speculative_generate
from mmspec.sampling import SamplingConfig
from mmspec.tree import DraftTree
from mmspec.types import TokenPrompt

from .test_loop import DRAFTERS, PROMPTS


def test_tree_structure_from_parents():
    #        0
    #      1   2
    #     3 4   5
    tree = DraftTree.from_parents([-1, 0, 0, 1, 1, 2])
    assert tree.max_depth == 2 and tree.max_children == 2
    assert tree.depth.tolist() == [[0, 1, 1, 2, 2, 2]]
    assert tree.children[0, 0].tolist() == [1, 2] and tree.children[0, 2].tolist() == [5, -1]
    assert tree.ancestor_mask[0, 4].tolist() == [True, True, False, False, True, False]
    assert tree.positions(torch.tensor([10])).tolist() == [[10, 11, 11, 12, 12, 12]]
    chain = DraftTree.chain(3, batch_size=2)
    assert chain.max_depth == 3 and torch.equal(chain.ancestor_mask[1], torch.ones(4, 4, dtype=torch.bool).tril())


@pytest.mark.parametrize("parents,match", [([0, 0], "root"), ([-1, 2, 0], "topological")])
def test_tree_rejects_bad_parents(parents, match):
    with pytest.raises(ValueError, match=match):
        DraftTree.from_parents(parents)


def test_incremental_decode_matches_full_forward(target):
    tokens = torch.randint(0, target.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(9).expand(3, 9)
    full = target(tokens, positions, target.new_cache(3, 16)).logits
    cache = target.new_cache(3, 16)
    parts = []
    for lo, hi in [(0, 4), (4, 5), (5, 9)]:
        parts.append(target(tokens[:, lo:hi], positions[:, lo:hi], cache).logits)
        cache.commit(torch.full((3,), hi - lo))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_rollback_hides_rejected_tokens(target):
    tokens = torch.randint(0, target.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(6).expand(2, 6)
    cache = target.new_cache(2, 16)
    target(tokens[:, :3], positions[:, :3], cache)
    cache.commit(torch.tensor([3, 3]))
    garbage = torch.randint(0, target.vocab_size, (2, 4))
    target(garbage, torch.arange(3, 7).expand(2, 4), cache)  # drafts, then rejected
    cache.rollback(torch.tensor([3, 3]))
    got = target(tokens[:, 3:], positions[:, 3:], cache).logits
    want = target(tokens, positions, target.new_cache(2, 16)).logits[:, 3:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_tree_compaction_equals_running_the_accepted_path(target):
    """Verify a tree, keep a different path per row (ragged), then continue: must equal plain decoding."""
    gen = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, target.vocab_size, (2, 5), generator=gen)
    tree = DraftTree.from_parents([[-1, 0, 0, 1, 2, 4]] * 2)
    nodes = torch.randint(0, target.vocab_size, (2, 6), generator=gen)
    cache = target.new_cache(2, 32)
    target(prefix, torch.arange(5).expand(2, 5), cache)
    cache.commit(torch.tensor([5, 5]))
    mask = cache.attention_mask(cache.slots(6), tree.ancestor_mask)
    target(nodes, tree.positions(cache.lengths), cache, mask)
    # Row 0 keeps root -> 1 -> 3; row 1 keeps root -> 2 -> 4 -> 5.
    path = torch.tensor([[0, 1, 3, -1], [0, 2, 4, 5]])
    cache.compact(path, torch.tensor([3, 4]))
    assert cache.lengths.tolist() == [8, 9]
    nxt = torch.randint(0, target.vocab_size, (2, 1), generator=gen)
    got = target(nxt, cache.lengths[:, None], cache).logits[:, 0]
    for b, keep in enumerate([[0, 1, 3], [0, 2, 4, 5]]):
        seq = torch.cat([prefix[b], nodes[b, keep], nxt[b]])[None]
        want = target(seq, torch.arange(seq.shape[1])[None], target.new_cache(1, 32)).logits[0, -1]
        torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-5)


def test_cfg_halves_move_together_and_blocked_keys():
    cache = StaticKVCache(1, batch_size=2, num_kv_heads=1, max_seq_len=8, head_dim=2, groups=2)
    cache.commit(torch.tensor([3, 1]))
    cache.block_keys(torch.tensor([[True, False], [False, False]]))
    mask = cache.attention_mask(cache.slots(2))  # [4, 1, 2, 8]
    assert mask.shape == (4, 1, 2, 8)
    assert torch.equal(mask[0], mask[2]) and torch.equal(mask[1], mask[3])
    assert mask[0, 0, 0].tolist() == [False, True, True, True, False, False, False, False]
    assert mask[1, 0, 1].tolist() == [True, True, True, False, False, False, False, False]
    with pytest.raises(ValueError, match=">= 1"):
        StaticKVCache(1, 0, 1, 8, 2)


def test_limit_keys_rounds_up_to_the_bucket_and_resets():
    cache = StaticKVCache(1, 2, 1, 100, 4, key_bucket=16)
    assert cache.key_len == 100 and cache.bounds_keys
    assert not StaticKVCache(1, 1, 1, 16, 4, key_bucket=16).bounds_keys  # one bucket holds the whole buffer
    cache.limit_keys(17)
    assert cache.key_len == 32 and cache.attention_mask(cache.slots(3)).shape == (2, 1, 3, 32)
    keys, values = cache.write(0, torch.ones(2, 1, 3, 4), torch.ones(2, 1, 3, 4), cache.slots(3))
    assert keys.shape == values.shape == (2, 1, 32, 4) and float(cache.k[0, :, :, :3].sum()) == 24.0
    cache.limit_keys(99)
    assert cache.key_len == 100  # never beyond the buffer
    cache.limit_keys(5)
    cache.reset()
    assert cache.key_len == 100
    off = StaticKVCache(1, 1, 1, 100, 4)  # key_bucket 0: every slot, whatever the loop asks
    off.limit_keys(5)
    assert off.key_len == 100
    with pytest.raises(ValueError, match="key_bucket must be >= 0"):
        StaticKVCache(1, 1, 1, 8, 4, key_bucket=-1)


@pytest.mark.parametrize("drafter", ["none", "ngram", "model-chain", "model-tree", "sjd"])
@pytest.mark.parametrize("batch", [1, 3])
def test_attention_over_the_filled_slots_gives_the_same_tokens(target, draft_model, drafter, batch):
    """A cache far longer than the run with key buckets of 8: the loop bounds every step's attention
    to the filled slots plus one window (rounded up), and the tokens equal those of attention over
    the whole buffer (chains, a tree, a ragged batch); the cache reads every slot again afterwards."""
    prompt = TokenPrompt.from_lists(PROMPTS[:batch])
    c = target.config
    outs, key_lens = [], []
    for bucket in (0, 8):
        cache = StaticKVCache(c.n_layer, batch, c.n_kv_head or c.n_head, 200, c.head_dim, key_bucket=bucket)
        seen = []
        out = speculative_generate(
            target,
            prompt,
            cache,
            max_new_tokens=30,
            drafter=None if drafter == "none" else DRAFTERS[drafter](target, draft_model),
            num_draft_tokens=4,
            sampling=SamplingConfig(temperature=0),
            generator=torch.Generator().manual_seed(0),
            callback=lambda step, num, ctx, cache=cache, seen=seen: seen.append(cache.key_len),
        )
        outs.append(out)
        key_lens.append(seen)
        assert cache.key_len == 200
    assert torch.equal(outs[0].tokens, outs[1].tokens) and torch.equal(outs[0].lengths, outs[1].lengths)
    assert set(key_lens[0]) == {200}
    assert max(key_lens[1]) <= 64 and all(n % 8 == 0 for n in key_lens[1]) and key_lens[1] == sorted(key_lens[1])
