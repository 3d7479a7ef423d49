"""The causal loop: draft → verify → commit a prefix → stats, for any target and drafter.

Invariant between steps: every committed token is in the target's KV cache except the last one
(``last_tokens``), which is fed as the first input of the next verify forward. So one target
forward over ``[last, d_1 .. d_k]`` (or ``[last, tree nodes]``) both writes the cache and yields
the ``k + 1`` distributions the acceptance rule needs; commit just moves cache lengths (chains)
or compacts the accepted path (trees). Rows of a batch accept different numbers of tokens
(ragged); finished rows keep their state frozen while the others go on.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..acceptance import AcceptanceRule
from ..cache import StaticKVCache
from ..kernels.rows import gather_rows
from ..sampling import SamplingConfig, logits_to_probs, sample_from_probs, seen_tokens
from ..stats import SpecStats
from ..types import Categorical, CommitMode, Draft, DraftContext, Drafter, Target, TokenPrompt, Verdict
from .common import clock, hand_back, outside_inference_mode, resolve_rule


@dataclass
class GenerationOutput:
    """``tokens``: ``[B, max_new_tokens]`` generated ids (``pad_token_id`` after each row's end);
    ``lengths``: ``[B]`` generated tokens per row; ``stats``: :class:`~mmspec.stats.SpecStats`."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    stats: SpecStats


def required_cache_len(prompt_len: int, max_new_tokens: int, window: int) -> int:
    """Cache capacity for a prompt, the generated tokens and the verify windows.

    ``window`` = tokens per verify forward (``k + 1`` for a chain, ``N`` nodes for a tree; what
    ``drafter.verify_width(k)`` returns; 1 without a drafter). A row
    may overshoot ``max_new_tokens`` by up to one window before it stops, and a stopped row keeps
    writing (masked, never committed) one more window, hence two windows of headroom.
    """
    return prompt_len + max_new_tokens + 2 * window


# Inference mode, not just no_grad: ops skip autograd's view and version-counter bookkeeping (about a
# quarter fewer aten ops in a LlamaGen forward, 302 -> 218; benchmarks/RESULTS.md "Seventh stop"). What
# leaves the loop is a normal tensor -- the outputs (_finish) and what a callback makes (it runs outside
# inference mode) -- so callers may train on them or write them in place.
@torch.inference_mode()
def speculative_generate(
    target: Target,
    prompt: Any,
    cache: StaticKVCache,
    *,
    max_new_tokens: int,
    drafter: Drafter | None = None,
    acceptance: str | AcceptanceRule = "exact",
    num_draft_tokens: int = 4,
    sampling: SamplingConfig = SamplingConfig(),
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = -1,
    condition: Any = None,
    callback: Callable[[int, torch.Tensor, DraftContext], None] | None = None,
    profile: bool = False,
) -> GenerationOutput:
    """Generate ``max_new_tokens`` per row with speculative decoding (``drafter=None``: the plain
    autoregressive baseline through the same target, cache and sampling code).

    Args:
        target: the model (:class:`~mmspec.types.Target`). ``prompt``: what ``target.prefill`` takes
            (a :class:`~mmspec.types.TokenPrompt` for language models). ``cache``: an empty cache of
            capacity :func:`required_cache_len`.
        drafter, acceptance, num_draft_tokens: what proposes, the rule that decides, and how many
            draft tokens a chain drafter proposes per step (trees: the drafter's budget).
        sampling: the SAME configuration is used for draft and target distributions.
        generator: seeds every random draw (first token, drafts, acceptance).
        eos_token_id: a row stops after emitting it. ``condition``: passed to the drafter's context.
        callback: ``callback(step, num_generated [B], ctx)`` after every step (progress bars, streaming:
            ``ctx.history`` holds prompt + committed tokens up to ``ctx.history_lengths``). It runs
            outside inference mode, so what it computes or copies from its arguments is a normal tensor;
            its arguments themselves are inference tensors, to read (the loop owns them).
        profile: synchronise the device around draft, the verify forward and acceptance + commit to time
            them separately (``stats.draft_time`` / ``verify_time`` / ``accept_time``).
    """
    for name, value in (("max_new_tokens", max_new_tokens), ("num_draft_tokens", num_draft_tokens)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # 2.5 would fail deep inside torch
            raise ValueError(f"{name} must be an integer, got {value!r}")
    max_new_tokens, num_draft_tokens = int(max_new_tokens), int(num_draft_tokens)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if drafter is not None and num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be >= 1 when speculating, got {num_draft_tokens}")
    rule = resolve_rule(acceptance, CommitMode.PREFIX, "speculative_generate (the causal loop)")
    if rule.requires_greedy and not sampling.greedy:
        raise ValueError(f"acceptance rule {rule.name!r} needs greedy decoding (temperature=0 or top_k=1)")
    sampling.validate_vocab(target.vocab_size)
    if drafter is not None and drafter.vocab_size != target.vocab_size:
        raise ValueError(
            f"draft vocabulary size {drafter.vocab_size} does not match target vocabulary size "
            f"{target.vocab_size}: the drafter must share the target's tokenizer / codebook"
        )
    device = cache.device
    start = time.perf_counter()

    # 0. prefill: the condition/prompt enters the cache; the first token comes from the target.
    cache.limit_keys(None)  # a reused cache may still hold the last call's bound
    pre = target.prefill(prompt, cache)
    window = 1 if drafter is None else drafter.verify_width(num_draft_tokens)
    needed = required_cache_len(int(cache.lengths.max()), max_new_tokens, window)  # deliberate sync, once per call
    if cache.max_seq_len < needed:
        raise ValueError(
            f"the cache holds {cache.max_seq_len} positions but this run needs {needed} (prompt + max_new_tokens + "
            f"two verify windows of {window} tokens): size it with required_cache_len(prompt_len, max_new_tokens, "
            "drafter.verify_width(num_draft_tokens))"
        )
    batch = pre.output.logits.shape[0]
    k = num_draft_tokens if drafter is not None else 0
    prefix = (
        prompt.tokens if isinstance(prompt, TokenPrompt) else torch.zeros(batch, 0, dtype=torch.long, device=device)
    )
    prefix_len = (
        prompt.lengths if isinstance(prompt, TokenPrompt) else torch.zeros(batch, dtype=torch.long, device=device)
    )
    vocab = pre.output.logits.shape[-1]
    penalize = sampling.penalizes_repetition
    seen = seen_tokens(prefix, prefix_len, vocab) if penalize else None  # [B, V] prompt tokens
    first = sample_from_probs(
        logits_to_probs(pre.output.logits[:, -1], sampling, _last(pre.output.uncond_logits), seen), generator
    )
    # Two verify windows of headroom: a row overshoots max_new_tokens by less than one window, and
    # each step writes its whole verdict window past the row's history end (step 3).
    history = torch.full(
        (batch, prefix.shape[1] + max_new_tokens + 2 * window), pad_token_id, dtype=torch.long, device=device
    )
    history[:, : prefix.shape[1]] = prefix
    history.scatter_(1, prefix_len[:, None], first[:, None])
    ctx = DraftContext(
        history=history,
        history_lengths=prefix_len + 1,
        last_tokens=first,
        positions=cache.lengths.clone(),
        sampling=sampling,
        hidden_states=pre.output.hidden_states,
        uncond_hidden_states=pre.output.uncond_hidden_states,
        num_new=torch.ones_like(prefix_len),
        condition=condition,
        seen=seen_tokens(history, prefix_len + 1, vocab) if penalize else None,
    )
    num_out = torch.ones(batch, dtype=torch.long, device=device)  # generated so far, per row
    finished = first == eos_token_id if eos_token_id is not None else torch.zeros_like(first, dtype=torch.bool)
    stats = SpecStats(batch, k, max_new_tokens, device=device)
    stats.record_prefill()
    if drafter is not None:
        drafter.prefill(ctx, prompt, pre)

    while True:
        active = (num_out < max_new_tokens) & ~finished
        if not _go_on(active, cache, window):  # the one host sync per iteration
            break
        # 1. draft
        t0 = clock(profile, device)
        draft = drafter.draft(ctx, k, generator) if drafter is not None else Draft.empty(ctx.last_tokens)
        t1 = clock(profile, device)
        # 2. verify: one target forward over [last, drafts] (chain) or the tree rooted at `last`
        if draft.tree is None:
            inputs = torch.cat([ctx.last_tokens[:, None], draft.tokens], dim=1)
            out = target.forward(inputs, cache.slots(inputs.shape[1]), cache, None)
        else:
            inputs = draft.tokens
            mask = cache.attention_mask(cache.slots(inputs.shape[1]), draft.tree.ancestor_mask)
            out = target.forward(inputs, draft.tree.positions(cache.lengths), cache, mask)
        t_forward = clock(profile, device)
        window_seen = _window_seen(ctx.seen, inputs, draft.tree) if penalize else None  # [B, T, V]
        target_probs = logits_to_probs(out.logits, sampling, out.uncond_logits, window_seen)  # [B, T, V]
        rule_sampling = rule.target_sampling(sampling)  # e.g. official LANTERN greedy: softmax at temperature 1
        rule_probs = (
            target_probs
            if rule_sampling == sampling
            else logits_to_probs(out.logits, rule_sampling, out.uncond_logits, window_seen)
        )
        verdict = _verify(rule, draft, target_probs, generator, rule_probs)
        # 3. commit: cache, outputs, drafter (finished rows commit nothing)
        num_new = (verdict.num_accepted + 1) * active
        path = None
        if draft.tree is None:
            cache.commit(num_new)
        else:
            path = draft.tree.path_offsets(verdict.accepted_nodes)  # [B, D + 1]
            cache.compact(path, num_new)
        stats.record_step(active, verdict, num_out)
        # The whole verdict window, unmasked (1 scatter instead of ~12 ops): entries past what a row
        # commits, and all of a finished row's, land past its history end, which nothing reads (the
        # history is defined up to history_lengths) and the row's next step overwrites.
        window_index = ctx.history_lengths[:, None] + torch.arange(verdict.tokens.shape[1], device=device)
        history.scatter_(1, window_index, verdict.tokens)
        new_last = verdict.tokens.gather(1, verdict.num_accepted[:, None])[:, 0]
        if eos_token_id is not None:
            hit_eos = (
                (verdict.tokens == eos_token_id)
                & (torch.arange(verdict.tokens.shape[1], device=device)[None] < num_new[:, None])
            ).any(1)
            finished = finished | hit_eos
        ctx = DraftContext(
            history=history,
            history_lengths=ctx.history_lengths + num_new,
            last_tokens=torch.where(active, new_last, ctx.last_tokens),
            positions=cache.lengths.clone(),
            sampling=sampling,
            hidden_states=_path_features(out.hidden_states, path),
            uncond_hidden_states=_path_features(out.uncond_hidden_states, path),
            target_probs=target_probs,
            num_new=num_new,
            condition=condition,
            seen=seen_tokens(history, ctx.history_lengths + num_new, vocab) if penalize else None,
        )
        num_out += num_new
        if drafter is not None:
            drafter.commit(ctx, verdict)
        # 4. stats (profile: draft / target forward / rule + commit)
        stats.draft_time += t1 - t0
        stats.verify_time += t_forward - t1
        stats.accept_time += clock(profile, device) - t_forward
        if callback is not None:
            outside_inference_mode(callback, stats.steps, num_out, ctx)

    cache.limit_keys(None)  # the bound holds for this loop's forwards only: callers get the whole cache back
    stats.total_time = time.perf_counter() - start
    if not profile:
        stats.draft_time = stats.verify_time = stats.accept_time = 0.0
    return _finish(history, prefix_len, num_out, max_new_tokens, eos_token_id, pad_token_id, stats)


def _go_on(active: torch.Tensor, cache: StaticKVCache, window: int) -> bool:
    """Whether any row is still generating (``active`` ``[B]`` bool). Deliberate host sync, the one per
    step; a cache with ``key_bucket`` also reads its longest row in the same transfer and bounds the
    next forward's attention to the filled slots plus one ``window`` (:meth:`StaticKVCache.limit_keys`)."""
    if not cache.bounds_keys:
        return bool(active.any())
    go_on, longest = torch.stack([active.any().long(), cache.lengths.max()]).tolist()
    cache.limit_keys(longest + window)
    return bool(go_on)


def _window_seen(seen: torch.Tensor, inputs: torch.Tensor, tree) -> torch.Tensor:
    """``[B, T, V]``: the ids a verify position conditions on -- prompt + committed (``seen [B, V]``)
    plus the drafts on its own path (chain: inputs ``1..i``; tree: node ``i``'s ancestors and itself)
    -- so a repetition penalty gives each position exactly the baseline's logits (lossless)."""
    num = inputs.shape[1]
    if tree is None:
        path = torch.ones(num, num, dtype=torch.bool, device=inputs.device).tril()[None]  # [1, T, T]
    else:
        path = tree.ancestor_mask  # [B, T, T] ancestors and self
    one_hot = torch.nn.functional.one_hot(inputs, seen.shape[-1]).float()  # [B, T, V]
    return seen[:, None] | (torch.matmul(path.float(), one_hot) > 0)  # inputs[0] = last is already in seen


def _last(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x[:, -1]


def _verify(
    rule: AcceptanceRule,
    draft: Draft,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
    rule_probs: torch.Tensor | None = None,
) -> Verdict:
    """Apply the rule to ``rule_probs`` (``target_probs`` under :meth:`AcceptanceRule.target_sampling`;
    default ``target_probs``); an empty draft (the baseline) is a plain sample from ``target_probs``."""
    if draft.tokens.shape[1] == 0:
        token = sample_from_probs(target_probs[:, 0], generator)
        return Verdict(torch.zeros_like(token), token[:, None], is_bonus=torch.ones_like(token, dtype=torch.bool))
    return rule.verify(draft, Categorical(target_probs if rule_probs is None else rule_probs), generator)


def _path_features(hidden: torch.Tensor | None, path: torch.Tensor | None) -> torch.Tensor | None:
    """Target features ``[B, D + 1, H]`` of the committed inputs (chains: all inputs, in order;
    trees: the root then the accepted path)."""
    if hidden is None or path is None:
        return hidden
    return gather_rows(hidden, path.clamp(min=0))


def _finish(history, prefix_len, num_out, max_new_tokens, eos_token_id, pad_token_id, stats) -> GenerationOutput:
    """Cut each row to ``max_new_tokens`` (and after its first EOS); pad the rest. The tokens and lengths
    and the stats' tensors are copied out of inference mode, so callers may train on them or write them
    in place (inference tensors allow neither outside it)."""
    j = torch.arange(max_new_tokens, device=history.device)[None]
    tokens = history.gather(1, (prefix_len[:, None] + j).clamp(max=history.shape[1] - 1))
    lengths = num_out.clamp(max=max_new_tokens)
    if eos_token_id is not None:
        is_eos = (tokens == eos_token_id) & (j < lengths[:, None])
        first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, lengths)
        lengths = torch.minimum(lengths, first_eos)
    tokens = torch.where(j < lengths[:, None], tokens, pad_token_id)
    stats.trim(lengths)
    tokens, lengths = hand_back(stats, tokens, lengths)
    return GenerationOutput(tokens=tokens, lengths=lengths, stats=stats)
