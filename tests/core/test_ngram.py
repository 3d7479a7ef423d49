"""The n-gram drafter proposes only what it matched (variable width), losslessly, alone or under an
adaptive window."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mmspec.drafters import AdaptiveWindow, NGramDrafter
from mmspec.sampling import SamplingConfig
from mmspec.types import DraftContext, Verdict

from ..conftest import tiny_lm
from .test_loop import generate


def _ctx(rows: list[list[int]], width: int = 32) -> DraftContext:
    history = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        history[i, : len(row)] = torch.tensor(row)
    lengths = torch.tensor([len(r) for r in rows])
    return DraftContext(
        history=history,
        history_lengths=lengths,
        last_tokens=history.gather(1, (lengths - 1)[:, None])[:, 0],
        positions=lengths - 1,
        sampling=SamplingConfig(temperature=0),
    )


def test_proposes_only_the_matched_continuation():
    drafter = NGramDrafter(16, max_ngram=2, min_ngram=1)
    # "5 6" occurred before, followed by "7 8" and then the key itself: the continuation is 7 8 5 6 (4 tokens known)
    assert drafter.draft(_ctx([[1, 5, 6, 7, 8, 5, 6]]), 8, None).tokens.tolist() == [[7, 8, 5, 6]]
    # capped at num_draft_tokens
    assert drafter.draft(_ctx([[1, 5, 6, 7, 8, 5, 6]]), 2, None).tokens.tolist() == [[7, 8]]
    # no earlier occurrence of the last token: nothing proposed (a plain decoding step)
    assert drafter.draft(_ctx([[1, 2, 3, 4]]), 8, None).tokens.shape == (1, 0)


def test_batch_width_min_and_max():
    rows = [[1, 5, 6, 7, 8, 5, 6], [3, 4, 9, 3]]  # row 0 matches 4 tokens, row 1 matches "3" -> "4 9 3" (3 tokens)
    assert NGramDrafter(16, max_ngram=2, min_ngram=1).draft(_ctx(rows), 8, None).tokens.tolist() == [
        [7, 8, 5],
        [4, 9, 3],
    ]
    wide = NGramDrafter(16, max_ngram=2, min_ngram=1, batch_width="max").draft(_ctx(rows), 8, None).tokens
    assert wide.tolist() == [[7, 8, 5, 6], [4, 9, 3, 3]]  # row 1 pads with its last token
    none = [[1, 5, 6, 7, 8, 5, 6], [1, 2]]  # row 1 has no match: "min" drafts nothing for the batch
    assert NGramDrafter(16, max_ngram=2, min_ngram=1).draft(_ctx(none), 8, None).tokens.shape == (2, 0)
    with pytest.raises(ValueError, match="batch_width must be one of"):
        NGramDrafter(16, batch_width="mean")


@pytest.mark.parametrize("batch_width", ["min", "max"])
@pytest.mark.parametrize("window", [None, "heuristic", "cost"])
@pytest.mark.parametrize("acceptance", ["greedy", "exact"])
def test_variable_width_ngram_is_lossless(batch_width, window, acceptance):
    target = tiny_lm(vocab_size=12, dim=32, n_layer=2, seed=3)  # small vocabulary: greedy output repeats itself
    prompts = [[1, 2, 3, 4, 1, 2, 3], [5, 6, 5, 6, 5], [7, 8, 9]]
    drafter = NGramDrafter(12, batch_width=batch_width)
    if window is not None:
        drafter = AdaptiveWindow(drafter, policy=window)
    for batch in (1, 3):
        base = generate(target, prompts[:batch], max_new=40)
        spec = generate(target, prompts[:batch], drafter, k=6, acceptance=acceptance, max_new=40)
        assert torch.equal(spec.tokens, base.tokens)
        assert spec.stats.steps < base.stats.steps  # the repeats were found and accepted
        widths = spec.stats.draft_widths
        assert min(widths) < max(widths) <= 6  # widths vary with what matched
    if window is not None:
        assert drafter.widths[-len(widths) :] == widths  # the window records the widths actually drafted


def test_adaptive_cap_ignores_short_full_drafts():
    """A fully accepted draft that stopped short of the cap (the n-gram matched less) says nothing about
    the cap: it stays; a rejection still lowers it (transformers' heuristic)."""
    window = AdaptiveWindow(NGramDrafter(16, max_ngram=2, min_ngram=1), policy="heuristic", initial=6)
    ctx = _ctx([[1, 5, 6, 7, 8, 5, 6]])
    draft = window.draft(ctx, 8, None)
    assert draft.tokens.shape[1] == 4 and window.widths == [4]

    def verdict(n):
        return Verdict(torch.tensor([n]), torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 5, dtype=torch.bool))

    window.commit(_with_new(ctx, 5), verdict(4))
    assert window._width == 6
    window.draft(ctx, 8, None)
    window.commit(_with_new(ctx, 2), verdict(1))
    assert window._width == 5


def _with_new(ctx: DraftContext, n: int) -> DraftContext:
    return replace(ctx, num_new=torch.tensor([n]))
