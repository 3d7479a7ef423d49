"""Online distillation of vision-aware EAGLE drafters from a live VLM target.

No corpus is stored (SpecVLM's online-logit distillation, Huang et al. 2025, arXiv 2509.11815):
every step draws ``(images, question)`` prompts, lets the target answer them itself (greedy or
sampled; ViSpec's recipe of long target-generated answers, Kang et al. 2025, arXiv 2509.15235, is
``answer_len`` plus an instruction asking for detail), teacher-forces prompt + answer through the
target for its features ``f_t`` and trains the head on the same layout it drafts from
(:func:`~mmspec.pipelines.vlm.drafter_layout.lay_out`), visual-path parameters jointly, with EAGLE's loss
(:func:`mmspec.training.eagle.eagle_loss`: Smooth-L1 on features + ``w`` * cross-entropy against the
target's soft next-token distribution). A semi-autoregressive head (FLASH) adds the same loss for
each lookahead output against ``f_{t+1+j}``.

Pairs predicting an image feature, and answer tokens after the first end-of-sequence token, carry
no loss. Data parallelism: under ``accelerate launch`` every process draws its own prompts (data
index ``step * num_processes + rank``) and gradients are averaged across processes before each
optimiser step; one process behaves exactly as a plain run. The loop, checkpoints and resume are
EAGLE heads' own (:func:`mmspec.training.loop.train_head`): a resumed run ends with the same
weights as an uninterrupted one.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mmspec.loops import required_cache_len, speculative_generate
from mmspec.pipelines.vlm.drafter_layout import (
    DrafterLayout,
    SequencePairs,
    lay_out,
    sequence_pairs,
)
from mmspec.pipelines.vlm.drafters import VLMEagleDrafter, VLMEagleHead
from mmspec.pipelines.vlm.pipeline_vlm import VLMPipeline
from mmspec.pipelines.vlm.targets import VLMPrompt, VLMTarget
from mmspec.pipelines.vlm.visual_paths import VISUAL_PATHS
from mmspec.sampling import SamplingConfig
from mmspec.training.eagle import (
    DEFAULT_SEQ_LEN,
    Batches,
    EaglePairs,
    EagleTrainConfig,
    eagle_loss,
    eagle_training_pairs,
    step_generator,
)
from mmspec.training.loop import process_state, train_head

#: Questions used when none are given (``--prompts``), and ViSpec's long-answer instruction.
DEFAULT_QUESTIONS = ("Describe the image.", "What is in this picture?", "What do you see?")
LONG_ANSWER_INSTRUCTION = " Describe it in as much detail as possible."


def vlm_prompt_sampler(
    pipeline: VLMPipeline, items: Sequence[tuple[Any, str]], batch_size: int, long_answers: bool = False
) -> Callable[[torch.Generator], VLMPrompt]:
    """A prompt sampler: ``batch_size`` ``(images, question)`` items drawn with replacement, built
    with the pipeline's chat template and processor, on the target's device, images encoded.

    ``images``: None, one image (PIL or path) or a list; ``long_answers`` appends
    :data:`LONG_ANSWER_INSTRUCTION` to every question (ViSpec's data recipe).
    """
    target = pipeline.target

    def sample(generator: torch.Generator) -> VLMPrompt:
        index = torch.randint(len(items), (batch_size,), generator=generator).tolist()
        questions = [items[i][1] + (LONG_ANSWER_INSTRUCTION if long_answers else "") for i in index]
        prompt = pipeline.build_prompt([items[i][0] for i in index], questions)
        return target.encode_images(prompt.to(target.device, target.dtype))

    return sample


def distilled_batches(
    target: VLMTarget,
    make_prompt: Callable[[torch.Generator], VLMPrompt],
    config: EagleTrainConfig,
    sampling: SamplingConfig,
) -> Batches:
    """Step ``i`` -> ``(prompt, answer [B, seq_len])``: the target answers ``make_prompt``'s prompts
    itself (``config.seq_len`` tokens at most, -1 after a row's end-of-sequence token), both seeded
    by :func:`~mmspec.training.eagle.step_generator`, so step ``i`` always sees the same data."""
    eos = target.eos_token_ids

    def batch(step: int) -> tuple[VLMPrompt, torch.Tensor]:
        prompt = make_prompt(step_generator(config.seed, step))
        cache = target.new_cache(prompt.tokens.shape[0], required_cache_len(prompt.tokens.shape[1], config.seq_len, 1))
        out = speculative_generate(
            target,
            prompt,
            cache,
            max_new_tokens=config.seq_len,
            sampling=sampling,
            generator=step_generator(config.seed, step, target.device),
            eos_token_id=eos[0] if eos else None,
        )
        return prompt, out.tokens

    return batch


def distillation_sequence(
    target: VLMTarget, prompt: VLMPrompt, answer: torch.Tensor, dtype: torch.dtype
) -> SequencePairs:
    """Teacher-force ``prompt`` + ``answer [B, T]`` (-1 padded) through the target: pairs with
    their regression targets ``f_{t+1}`` and loss mask (an answer ends at its first EOS id)."""
    answer = answer.to(target.device)
    num_steps = answer.shape[1]
    is_eos = torch.isin(answer, torch.tensor(target.eos_token_ids, device=answer.device, dtype=answer.dtype))
    stop = is_eos | (answer < 0)  # [B, T] an EOS id ends the answer (and belongs to it); -1 is padding
    first = torch.where(stop.any(1), stop.float().argmax(1), num_steps)  # [B]
    answer_len = first + (is_eos.gather(1, first.clamp(max=num_steps - 1)[:, None])[:, 0] & (first < num_steps))
    steps = torch.arange(num_steps, device=answer.device)[None]
    answer = torch.where(steps < answer_len[:, None], answer, 0)  # any id: these pairs carry no loss
    pairs: EaglePairs = eagle_training_pairs(target, prompt, answer, prompt.tokens.shape[1])
    end = prompt.lengths.to(answer.device) + answer_len  # [B] one past the last real token
    width = pairs.next_tokens.shape[1]
    s = torch.arange(width, device=answer.device)[None]
    seq = sequence_pairs(target, prompt, pairs.next_tokens, pairs.features, end - 1, dtype, pairs.target_features)
    next_is_image = torch.cat([seq.is_image[:, 1:], torch.zeros_like(seq.is_image[:, :1])], 1)
    return replace(seq, valid=pairs.valid & (s + 1 < end[:, None]) & ~seq.is_image & ~next_is_image)


@dataclass
class _LaidOutHead:
    """The head applied to one batch's layout, in the call :func:`~mmspec.training.eagle.eagle_loss`
    makes (``head(tokens, features, slots, cache, slots, mask)``): the layout's input embeddings,
    RoPE ids and biases stand in for the token ids and slot positions. ``lookahead`` j > 0 returns
    the semi-autoregressive prediction of ``f_{t+1+j}``."""

    head: VLMEagleHead
    layout: DrafterLayout
    lookahead: int

    def new_cache(self, batch_size: int, max_seq_len: int):
        return self.head.new_cache(batch_size, max_seq_len)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.head.logits(features)

    def __call__(self, tokens, features, positions, cache, slots, attn_mask) -> torch.Tensor:
        layout = self.layout
        out = self.head.forward_inputs(layout.embeds, features, layout.rope, cache, slots, attn_mask, layout.bias)
        return out if self.lookahead == 0 else self.head.lookahead[self.lookahead - 1](out)


def _layout_pairs(layout: DrafterLayout, seq: SequencePairs, lookahead: int) -> EaglePairs:
    """EAGLE training pairs of the layout's text entries: entry at position ``t`` regresses
    ``f_{t+1+lookahead}`` where every pair up to ``t + lookahead`` has a target."""
    source = layout.source  # [B, M]
    index = (source + lookahead).clamp(0, seq.valid.shape[1] - 1)
    valid = (source >= 0) & seq.valid.gather(1, source.clamp(min=0)) & seq.valid.gather(1, index)
    wanted = seq.target_features.gather(1, index[..., None].expand(-1, -1, seq.target_features.shape[-1]))
    slot = torch.arange(source.shape[1], device=source.device)[None]
    return EaglePairs(torch.zeros_like(source), layout.features, wanted, valid, slot >= layout.lengths[:, None])


def vlm_drafter_loss(
    head: VLMEagleHead, seq: SequencePairs, feature_loss_weight: float, token_loss_weight: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """EAGLE's loss on the head's layout of ``seq``, summed over the semi-AR outputs."""
    layout = lay_out(head, seq)
    total, parts = 0.0, {}
    for j in range(head.config.tokens_per_step):
        loss, terms = eagle_loss(
            _LaidOutHead(head, layout, j), _layout_pairs(layout, seq, j), feature_loss_weight, token_loss_weight
        )
        total = total + loss
        parts.update({(name if j == 0 else f"{name}_{j}"): value for name, value in terms.items()})
    return total, parts


def train_vlm_drafter(target: VLMTarget, head: VLMEagleHead, batches: Batches, config: EagleTrainConfig) -> list[float]:
    """Train ``head`` (in place, visual path included) by online distillation from ``target``
    (frozen) on ``batches`` (e.g. :func:`distilled_batches`). Returns this call's per-step losses
    (this process's). Checkpoints (main process) hold weights, optimiser, step and RNG state;
    ``config.resume`` continues from the latest one."""
    dtype = head.fc.weight.dtype

    def step_loss(index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():  # the target is the teacher: frozen (its decode must not build graphs)
            prompt, answer = batches(index)
            seq = distillation_sequence(target, prompt, answer, dtype)
        return vlm_drafter_loss(head, seq, config.feature_loss_weight, config.token_loss_weight)

    return train_head(
        head, config, step_loss, desc=f"train VLM drafter ({head.config.visual_path})", data_parallel=True
    )


# ---------------------------------------------------------------------- command line
def add_train_vlm_drafter_args(parser: argparse.ArgumentParser) -> None:
    """The VLM options of ``mmspec train-drafter --target-kind vlm``; the shared ones (target path,
    output, steps, batch size, lr, sampling, checkpoints, device, ``--prompts`` = a questions file)
    come from :func:`mmspec.training.eagle.add_train_drafter_args`."""
    group = parser.add_argument_group("VLM drafters (--target-kind vlm)")
    group.add_argument(
        "--visual-path",
        default="vispec",
        choices=sorted(VISUAL_PATHS),
        help="what the drafter keeps of the image tokens (pipelines/vlm/visual_paths.py)",
    )
    group.add_argument("--ratio", type=int, default=4, help="image-token reduction of the compressing paths")
    group.add_argument("--num-queries", type=int, default=64, help="learned queries per image (vispec, flash)")
    group.add_argument(
        "--tokens-per-step",
        type=int,
        default=None,
        help="drafts per head forward in chains (default: 2 for flash, else 1)",
    )
    group.add_argument(
        "--images",
        type=Path,
        default=None,
        help="folder or list file of training images (default: rendered emoji scenes)",
    )
    group.add_argument("--num-images", type=int, default=256, help="emoji scenes rendered when --images is not given")
    group.add_argument(
        "--answer-len",
        type=int,
        default=None,
        help="tokens the target answers per prompt (default: --seq-len); long ones + --long-answers "
        "are ViSpec's data recipe",
    )
    group.add_argument("--long-answers", action="store_true", help="ask the target for detailed answers (ViSpec)")


def _training_items(args: argparse.Namespace) -> list[tuple[Any, str]]:
    """``(image, question)`` items: every image with every question."""
    questions = list(DEFAULT_QUESTIONS)
    if args.prompts is not None:
        questions = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    if args.images is not None:
        from mmspec.data.images import image_list

        images = image_list(args.images)
    else:
        from mmspec.data.emoji import EmojiDataset

        try:
            dataset = EmojiDataset(image_size=64, num_samples=args.num_images, seed=args.seed, return_pil=True)
        except FileNotFoundError as exc:
            raise SystemExit(f"error: no --images given and the emoji scenes cannot be rendered: {exc}") from exc
        images = [dataset[i]["image"] for i in range(len(dataset))]
    if not images or not questions:
        raise SystemExit("error: train-drafter --target-kind vlm needs at least one image and one question")
    return [(image, question) for image in images for question in questions]


def train_vlm_drafter_command(args: argparse.Namespace) -> int:
    """Train a vision-aware EAGLE drafter for a VLM checkpoint by online distillation; save it."""
    try:  # a folder holding another model, or damaged files: the loader's message names what is wrong
        pipeline = VLMPipeline.from_pretrained(args.target_path, device=args.device)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: --target-path {args.target_path}: {err}") from None
    target = pipeline.target
    options = {"ratio": args.ratio, "num_queries": args.num_queries}
    if args.tokens_per_step is not None:
        options["tokens_per_step"] = args.tokens_per_step
    head = VLMEagleHead.for_target(target, args.visual_path, n_head=args.n_head, **options)
    config = EagleTrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seq_len=args.answer_len or args.seq_len or DEFAULT_SEQ_LEN,
        seed=args.seed,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
    )
    make_prompt = vlm_prompt_sampler(pipeline, _training_items(args), config.batch_size, args.long_answers)
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    losses = train_vlm_drafter(target, head, distilled_batches(target, make_prompt, config, sampling), config)
    if process_state().is_main_process:
        VLMEagleDrafter(head, target).save_pretrained(args.output)
        print(
            f"trained a {args.visual_path!r} VLM drafter for {len(losses)} steps"
            + (f" (final loss {losses[-1]:.4f})" if losses else "")
            + f"; wrote {args.output}"
        )
    return 0
