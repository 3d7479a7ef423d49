"""Training EAGLE-3 heads (Li et al. 2025, arXiv 2503.01840) for LM and VLM targets.

Data: the existing self-distillation / online-distillation paths (``step -> (prompt, tokens)``:
:func:`mmspec.training.eagle.self_distilled_batches` for LMs,
:func:`mmspec.training.vlm.distilled_batches` for VLMs), teacher-forced through the target wrapped
by :class:`~mmspec.drafters.eagle3.AuxFeatureTarget` (its three auxiliary layers and its own final
feature, whose LM head gives the soft labels).

**Training-time test** (Sec. 3.1, Fig. 6). Step 0 reads ``(g_s = fc(a_s), x_{s+1})`` at RoPE
position ``s`` (causal over the sequence) and predicts ``x_{s+2}``. Step ``j >= 1`` reads the head's
own step ``j - 1`` output ``o^{j-1}_s`` with the true token ``x_{s+1+j}`` at RoPE position ``s + j``;
its query sees the step-0 keys at positions ``<= s`` and its own chain's keys of steps ``1 .. j``
(the diagonal) -- exactly what drafting ``j`` tokens past a committed position ``s`` sees. Loss:
cross-entropy against the target's next-token distribution restricted to the draft vocabulary
(renormalised), step ``j`` weighted ``decay^j`` (SpecForge's 0.8), averaged over valid positions.

**Reduced vocabulary** (VocabTrim, arXiv 2506.22694): before training, the ``draft_vocab_size`` most
frequent target tokens of the first ``vocab_batches`` batches (prompts and answers) form the draft
vocabulary (``d2t`` / ``t2d``; ties and a short corpus are filled by the lowest unused ids).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..drafters.eagle3 import AuxFeatureTarget, Eagle3Drafter, Eagle3Head, eagle3_head_for_lm
from ..sampling import SamplingConfig
from ..types import TokenPrompt
from .eagle import (
    DEFAULT_SEQ_LEN,
    TARGET_KINDS,
    Batches,
    EagleTrainConfig,
    eagle_training_pairs,
    load_lm_target,
    self_distilled_batches,
)
from .loop import process_state, train_head


@dataclass
class Eagle3TrainConfig(EagleTrainConfig):
    """:class:`~mmspec.training.eagle.EagleTrainConfig` plus EAGLE-3's settings.

    Args:
        ttt_steps: unrolled training-time-test steps (SpecForge uses 7; 1 = no test-time unrolling).
        step_decay: weight ``decay^j`` of step ``j``'s loss.
        vocab_batches: batches counted to choose the draft vocabulary.
        init_lm_head: ``"random"`` (EAGLE-3's head is trained from scratch) or ``"target"``: start
            ``lm_head`` from the target's LM-head rows of the draft vocabulary and ``norm`` from the
            target's final norm (a warm start for small training budgets; an mmspec choice).
    """

    ttt_steps: int = 3
    step_decay: float = 0.8
    vocab_batches: int = 8
    init_lm_head: str = "random"


@dataclass
class Eagle3Batch:
    """One teacher-forced batch, pair-aligned by sequence position ``s`` (``S`` positions per row):
    ``aux [B, S, 3H_t]`` (``a_s``), ``next_tokens [B, S]`` (``x_{s+1}``), ``target_logits [B, S, V]``
    (the target's logits at ``s + 1``: the law of ``x_{s+2}``), ``valid [B, S]``, ``blocked [B, S]``
    and RoPE ids ``rope`` (``[B, S]`` or ``[3, B, S]``)."""

    aux: torch.Tensor
    next_tokens: torch.Tensor
    target_logits: torch.Tensor
    valid: torch.Tensor
    blocked: torch.Tensor
    rope: torch.Tensor


def _lm_head(target: Any) -> torch.nn.Linear:
    return getattr(target, "decoder", target).output


def teacher_force(head: Eagle3Head, target: Any, prompt: Any, tokens: torch.Tensor, max_prompt_len: int) -> Eagle3Batch:
    """Run ``prompt`` + ``tokens [B, T]`` (-1 after a row's end) through the target (frozen) and lay
    the result out for :func:`eagle3_ttt_loss`. Pairs predicting tokens past a row's end, and pairs
    whose next token or the token after it is an image placeholder, carry no loss."""
    wrapped = AuxFeatureTarget(target, head.config.aux_layer_ids, include_final=True)
    if isinstance(prompt, TokenPrompt):  # VLM prompts vary in width
        max_prompt_len = max(max_prompt_len, prompt.tokens.shape[1])
    ended = tokens < 0
    after_end = ended.long().cumsum(1) > 0
    pairs = eagle_training_pairs(wrapped, prompt, tokens.clamp(min=0), max_prompt_len)
    width = 3 * head.config.target_hidden_size
    aux, final_next = pairs.features[..., :width], pairs.target_features[..., width:]  # a_s ; f_{s+1}
    lm_head = _lm_head(target)
    target_logits = F.linear(final_next.to(lm_head.weight.dtype), lm_head.weight.detach()).float()  # [B, S, V]
    batch, seq = pairs.next_tokens.shape
    s = torch.arange(seq, device=aux.device)[None]
    lengths = (
        prompt.lengths.to(aux.device)
        if isinstance(prompt, TokenPrompt)
        else torch.zeros(batch, dtype=torch.long, device=aux.device)
    )
    # Generated token j sits at sequence position lengths + j; a pair s predicts position s + 2.
    answer_end = lengths + (~after_end).sum(1).to(aux.device)  # [B] one past the last real token
    valid = pairs.valid & (s + 1 < answer_end[:, None])  # x_{s+1} is a real token (its feature f_{s+1} is)
    image_id = getattr(target, "image_token_id", None)
    if image_id is not None:
        is_image = pairs.next_tokens == image_id  # x_{s+1}
        valid = valid & ~is_image & ~torch.cat([is_image[:, 1:], torch.zeros_like(is_image[:, :1])], 1)
    rope_fn = getattr(target, "rope_positions", None)
    rope = s.expand(batch, -1)
    if rope_fn is not None and isinstance(prompt, TokenPrompt):
        prompt_rope, offsets = rope_fn(prompt)  # [B, P] / [3, B, P]; [B]
        after = s + offsets.to(aux.device)[:, None]  # text after the prompt
        width_p = prompt_rope.shape[-1]
        padded = torch.cat([prompt_rope, prompt_rope.new_zeros(*prompt_rope.shape[:-1], seq - width_p)], -1)
        in_prompt = s < lengths[:, None]
        rope = torch.where(in_prompt, padded, after if prompt_rope.dim() == 2 else after[None].expand(3, -1, -1))
    return Eagle3Batch(aux, pairs.next_tokens, target_logits, valid, pairs.blocked, rope)


def eagle3_ttt_loss(
    head: Eagle3Head, batch: Eagle3Batch, ttt_steps: int, step_decay: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """EAGLE-3's training-time-test loss (see the module docstring) and per-step accuracies."""
    layer, attn = head.midlayer, head.midlayer.self_attn
    rows, seq = batch.next_tokens.shape
    device = batch.aux.device
    hidden = head.fuse(batch.aux)  # [B, S, H] g_s
    eye = torch.eye(seq, dtype=torch.bool, device=device)[None].expand(rows, -1, -1)  # [B, S, S]
    causal = (torch.ones(seq, seq, dtype=torch.bool, device=device).tril()[None] & ~batch.blocked[:, None, :]) | eye
    draft_ids = head.draft_to_target
    labels = batch.target_logits[..., draft_ids].softmax(-1)  # [B, S, V_d] target law on the draft vocabulary
    keys, values, masks = [], [], []
    total = hidden.new_zeros((), dtype=torch.float32)
    parts: dict[str, torch.Tensor] = {}
    for j in range(ttt_steps):
        tokens = _shift(batch.next_tokens, j, 0)  # x_{s+1+j}
        valid = _shift(batch.valid, j, False)  # pair s + j predicts x_{s+2+j}
        target = _shift(labels, j, 0.0)
        rope = batch.rope + j
        cos, sin = head.rope(rope)
        embeds = F.embedding(tokens, head.embedding).to(hidden.dtype)
        q, k, v = attn.qkv(layer.inputs(embeds, hidden), cos, sin)
        keys.append(k), values.append(v), masks.append(causal if j == 0 else eye)
        out = attn.attend(q, torch.cat(keys, 2), torch.cat(values, 2), torch.cat(masks, 2)[:, None])
        hidden = layer.finish(hidden, out)  # o^j_s
        log_q = head.draft_logits(hidden).log_softmax(-1)  # [B, S, V_d]
        count = valid.sum().clamp(min=1)
        loss = -((target * log_q).sum(-1) * valid).sum() / count
        total = total + step_decay**j * loss
        hit = (log_q.argmax(-1) == target.argmax(-1)) & valid
        parts[f"loss_{j}"] = loss.detach()
        parts[f"acc_{j}"] = hit.sum().float().detach() / count
    parts["feature_loss"] = parts["loss_0"]  # what train_head shows on its progress bar
    return total, parts


def _shift(x: torch.Tensor, j: int, fill) -> torch.Tensor:
    """``x[:, s + j]`` at index ``s`` (``[B, S, ...]``), ``fill`` past the end."""
    return torch.cat([x[:, j:], x.new_full((x.shape[0], min(j, x.shape[1]), *x.shape[2:]), fill)], 1)[:, : x.shape[1]]


def choose_draft_vocab(head: Eagle3Head, batches: Batches, num_batches: int) -> torch.Tensor:
    """The ``draft_vocab_size`` most frequent target ids of the first ``num_batches`` batches
    (prompt and generated tokens), ascending, set on ``head`` (``d2t`` / ``t2d``); returns them."""
    vocab, size = head.config.vocab_size, head.config.draft_vocab_size
    counts = torch.zeros(vocab, dtype=torch.long)
    for index in range(num_batches):
        prompt, tokens = batches(index)
        seen = [tokens.flatten().cpu()]
        if isinstance(prompt, TokenPrompt):
            valid = torch.arange(prompt.tokens.shape[1])[None] < prompt.lengths.cpu()[:, None]
            seen.append(prompt.tokens.cpu()[valid])
        ids = torch.cat(seen)
        ids = ids[(ids >= 0) & (ids < vocab)]
        counts += torch.bincount(ids, minlength=vocab)
    # Most frequent first; equal counts (and unseen ids) by ascending id: deterministic.
    order = torch.argsort(-counts * (vocab + 1) + torch.arange(vocab), stable=True)
    chosen = order[:size].sort().values
    head.set_draft_vocab(chosen)
    return chosen


def init_from_target(head: Eagle3Head, target: Any) -> None:
    """``lm_head`` <- the target's LM-head rows of the draft vocabulary, ``norm`` <- the target's
    final norm (widths must agree: a head as wide as its target)."""
    owner = getattr(target, "decoder", target)
    if owner.output.weight.shape[1] != head.config.hidden_size:
        raise ValueError("init_lm_head='target' needs a head as wide as the target")
    with torch.no_grad():
        head.lm_head.weight.copy_(owner.output.weight[head.draft_to_target])
        head.norm.weight.copy_(owner.norm.weight)


def train_eagle3_head(
    target: Any,
    head: Eagle3Head,
    batches: Batches,
    config: Eagle3TrainConfig,
    choose_vocab: bool = True,
    desc: str = "train EAGLE-3 head",
) -> list[float]:
    """Train ``head`` (in place) on ``batches`` for the frozen ``target``; with ``choose_vocab`` and a
    reduced draft vocabulary, pick it first (:func:`choose_draft_vocab`). Returns the per-step losses.
    Checkpoints / resume / data parallelism: :func:`~mmspec.training.loop.train_head`."""
    if config.init_lm_head not in ("random", "target"):
        raise ValueError(f"init_lm_head must be 'random' or 'target', got {config.init_lm_head!r}")
    if choose_vocab and head.config.draft_vocab_size < head.config.vocab_size and not config.resume:
        with torch.no_grad():
            choose_draft_vocab(head, batches, config.vocab_batches)
    if config.init_lm_head == "target" and not config.resume:
        init_from_target(head, target)

    def step_loss(index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():  # the target is the teacher: frozen
            prompt, tokens = batches(index)
            batch = teacher_force(head, target, prompt, tokens, config.max_prompt_len)
        return eagle3_ttt_loss(head, batch, config.ttt_steps, config.step_decay)

    return train_head(head, config, step_loss, desc=desc, data_parallel=True)


# ---------------------------------------------------------------------- command line
def add_train_eagle3_args(parser: argparse.ArgumentParser) -> None:
    """The EAGLE-3 options of ``mmspec train-drafter --arch eagle3`` (the shared ones -- target,
    output, steps, batch size, lr, sampling, checkpoints, device; ``--images`` / ``--prompts`` for
    VLMs -- come from the EAGLE and VLM argument groups)."""
    group = parser.add_argument_group("EAGLE-3 heads (--arch eagle3)")
    group.add_argument(
        "--arch",
        default="eagle",
        choices=("eagle", "eagle3"),
        help="eagle: EAGLE-1/2 feature head (VLMs: with --visual-path); eagle3: EAGLE-3 head over three "
        "fused target layers with a reduced draft vocabulary (exports to vLLM / SGLang)",
    )
    group.add_argument(
        "--draft-vocab-size",
        type=int,
        default=None,
        help="draft vocabulary: the most frequent target tokens of the training data (default: the full vocabulary)",
    )
    group.add_argument("--ttt-steps", type=int, default=3, help="training-time-test steps (EAGLE-3; SpecForge uses 7)")
    group.add_argument(
        "--aux-layers",
        default=None,
        help="three target layers whose outputs are fused, 'a,b,c' (0-based; default: 1, N/2-1, N-4)",
    )
    group.add_argument("--vocab-batches", type=int, default=8, help="batches counted to choose the draft vocabulary")
    group.add_argument(
        "--init-lm-head",
        default="random",
        choices=("random", "target"),
        help="target: start the draft LM head from the target's rows of the draft vocabulary",
    )


def _aux_layers(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        ids = tuple(int(part) for part in text.split(","))
    except ValueError:
        ids = ()
    if len(ids) != 3:
        raise SystemExit(f"error: --aux-layers takes three comma-separated layer ids, got {text!r}")
    return ids  # type: ignore[return-value]


def train_eagle3_command(args: argparse.Namespace) -> int:
    """Train an EAGLE-3 head for an LM (``--target-kind lm``) or VLM (``--target-kind vlm``) target."""
    config = Eagle3TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seq_len=getattr(args, "answer_len", None) or args.seq_len or DEFAULT_SEQ_LEN,
        seed=args.seed,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        ttt_steps=args.ttt_steps,
        vocab_batches=args.vocab_batches,
        init_lm_head=args.init_lm_head,
    )
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    aux = _aux_layers(args.aux_layers)
    if args.target_kind == "vlm":
        from mmspec.pipelines.vlm.eagle3 import eagle3_head_for_vlm
        from mmspec.pipelines.vlm.pipeline_vlm import VLMPipeline

        from .vlm import _training_items, distilled_batches, vlm_prompt_sampler

        try:  # a folder holding another model, or damaged files: the loader's message names what is wrong
            pipeline = VLMPipeline.from_pretrained(args.target_path, device=args.device)
        except (OSError, ValueError) as err:
            raise SystemExit(f"error: --target-path {args.target_path}: {err}") from None
        target = pipeline.target
        head = eagle3_head_for_vlm(target, args.draft_vocab_size, aux)
        make_prompt = vlm_prompt_sampler(pipeline, _training_items(args), config.batch_size, args.long_answers)
        batches = distilled_batches(target, make_prompt, config, sampling)
    elif args.target_kind == "lm":
        try:
            target = load_lm_target(args.target_path, args.device)
        except ValueError as err:
            raise SystemExit(f"error: --target-path {args.target_path}: {err}") from None
        head = eagle3_head_for_lm(target, args.draft_vocab_size, aux)
        make_prompt, config.max_prompt_len = TARGET_KINDS["lm"].prompts(target, args, config.batch_size, args.device)
        batches = self_distilled_batches(target, make_prompt, config, sampling, args.device)
    else:
        raise SystemExit(f"error: --arch eagle3 trains heads for --target-kind lm or vlm, not {args.target_kind!r}")
    losses = train_eagle3_head(target, head, batches, config)
    if process_state().is_main_process:
        Eagle3Drafter(head.eval()).save_pretrained(args.output)
        print(
            f"trained an EAGLE-3 head (draft vocabulary {head.config.draft_vocab_size}, aux layers "
            f"{list(head.config.aux_layer_ids)}) for {len(losses)} steps"
            + (f" (final loss {losses[-1]:.4f})" if losses else "")
            + f"; wrote {args.output}"
        )
    return 0
