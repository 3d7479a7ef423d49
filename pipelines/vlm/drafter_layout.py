"""The drafter cache's layout (:mod:`~mmspec.pipelines.vlm.drafters`): the target's sequence as EAGLE
pairs with its image tokens, merged with a visual path's image entries by sequence position."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .targets import VLMPrompt, VLMTarget
from .visual_paths import ImageTokens

if TYPE_CHECKING:  # the head imports this module
    from .drafters import VLMEagleHead

# --------------------------------------------------------------------------- sequences and layouts


@dataclass
class SequencePairs:
    """A batch of sequences as EAGLE pairs by sequence position ``t`` (``S`` positions per row).

    ``next_tokens``: ``[B, S]`` ``x_{t+1}``. ``features``: ``[B, S, H]`` ``f_t``. ``rope``: ``[3, B, S]``
    the target's RoPE ids of ``t``. ``num_pairs``: ``[B]`` pairs ``t < num_pairs`` enter the layout.
    ``rope_offsets``: ``[B]`` RoPE id minus sequence position of the text after the prompt (M-RoPE
    deltas; zero for 1-D RoPE). ``image``: the prompt's image tokens (excluded from the text pairs).
    Training only: ``target_features`` ``[B, S, H]`` ``f_{t+1}`` and ``valid`` ``[B, S]`` the pairs
    with a loss target.
    """

    next_tokens: torch.Tensor
    features: torch.Tensor
    rope: torch.Tensor
    num_pairs: torch.Tensor
    rope_offsets: torch.Tensor
    image: ImageTokens
    is_image: torch.Tensor
    target_features: torch.Tensor | None = None
    valid: torch.Tensor | None = None


@dataclass
class DrafterLayout:
    """What the drafter cache holds for a batch of sequences: ``M`` entries per row (padded).

    ``embeds`` / ``features``: ``[B, M, H]``. ``rope``: ``[3, B, M]`` RoPE ids. ``bias``: ``[B, M, H]``
    ViSpec's global image features added to text entries, or None. ``source``: ``[B, M]`` the
    sequence position ``t`` of text entries (-1: image entry or padding). ``lengths``: ``[B]``
    entries per row. ``text_bias``: ``[B, H]`` the bias of text after the prompt (all its images).
    """

    embeds: torch.Tensor
    features: torch.Tensor
    rope: torch.Tensor
    bias: torch.Tensor | None
    source: torch.Tensor
    lengths: torch.Tensor
    text_bias: torch.Tensor


#: HF ``model_type`` -> tokens per side of one image's square token grid, for 1-D RoPE families
#: whose images are plain patch grids (M-RoPE families read their grids off the RoPE ids).
SQUARE_GRID_SIDE: dict[str, Callable[[object], int]] = {
    "llava": lambda config: config.vision_config.image_size // config.vision_config.patch_size,
}


def _image_tokens(
    target: VLMTarget,
    prompt: VLMPrompt,
    is_image: torch.Tensor,
    features: torch.Tensor,
    rope: torch.Tensor,
    dtype: torch.dtype,
) -> ImageTokens:
    """Collect the image tokens ``is_image [B, S]`` (grids from M-RoPE ids, or square LLaVA-1.5
    images, else one row per run of image tokens)."""
    device = is_image.device
    width = prompt.tokens.shape[1]
    in_prompt = (prompt.tokens == target.image_token_id) & (
        torch.arange(width, device=device)[None] < prompt.lengths[:, None]
    )  # [B, P]: the rows of prompt.image_features, in order
    embed_index = in_prompt.flatten().cumsum(0).view_as(in_prompt) - 1
    row, position = torch.nonzero(is_image, as_tuple=True)  # deliberate sync: once per prompt / training step
    n = row.shape[0]
    image_features = (
        prompt.image_features
        if n == 0 or prompt.image_features is not None
        else target.encode_images(prompt).image_features
    )
    embeds = image_features[embed_index[row, position]] if n else features.new_zeros(0, features.shape[-1])
    ids = rope[:, row, position].T  # [n, 3]
    new_run = torch.ones(n, dtype=torch.bool, device=device)
    new_run[1:] = (row[1:] != row[:-1]) | (position[1:] != position[:-1] + 1)
    run = new_run.cumsum(0) - 1
    run_first = torch.nonzero(new_run).squeeze(1)
    j = torch.arange(n, device=device) - run_first[run]  # index within the run
    if target.decoder.config.mrope_section is not None:  # M-RoPE: the (h, w) ids are the grid
        starts = torch.full((run_first.shape[0], 2), 1 << 30, device=device).scatter_reduce(
            0, run[:, None].expand(-1, 2), ids[:, 1:], "amin"
        )
        grid, new_span = ids[:, 1:] - starts[run], new_run
    else:
        side = SQUARE_GRID_SIDE.get(target.config.model_type, lambda config: 0)(target.config)
        per_image = max(side * side, 1)
        square = (torch.bincount(run)[run] % per_image == 0) & (side > 0)  # [n] the run is whole square images
        k = torch.where(square, j % per_image, j)
        grid = torch.stack([torch.where(square, k // max(side, 1), 0), torch.where(square, k % max(side, 1), k)], -1)
        new_span = new_run | (square & (k == 0))
    span = new_span.cumsum(0) - 1
    span_first = torch.nonzero(new_span).squeeze(1)
    num_spans = span_first.shape[0]
    span_grid = torch.zeros(num_spans, 2, dtype=torch.long, device=device).scatter_reduce(
        0, span[:, None].expand(-1, 2), grid + 1, "amax"
    )
    return ImageTokens(
        row=row,
        position=position,
        span=span,
        grid=grid,
        rope=ids,
        embeds=embeds.to(dtype),
        features=features[row, position].to(dtype),
        span_row=row[span_first],
        span_first=span_first,
        span_size=torch.bincount(span, minlength=num_spans),
        span_grid=span_grid,
    )


def _rope_ids(target: VLMTarget, prompt: VLMPrompt, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's RoPE ids ``[3, B, width]`` for the prompt and the text after it, and each
    row's offset ``[B]`` (1-D RoPE: three equal rows)."""
    positions, offsets = target.rope_positions(prompt)  # [B, P] or [3, B, P], [B]
    positions = positions.expand(3, -1, -1) if positions.dim() == 2 else positions
    s = torch.arange(width, device=positions.device)
    after = (s[None] + offsets[:, None]).expand(3, -1, -1)  # [3, B, width]
    prompt_ids = F.pad(positions, (0, width - positions.shape[-1]))
    inside = s[None] < prompt.lengths[:, None]
    return torch.where(inside, prompt_ids, after), offsets


def sequence_pairs(
    target: VLMTarget,
    prompt: VLMPrompt,
    next_tokens: torch.Tensor,
    features: torch.Tensor,
    num_pairs: torch.Tensor,
    dtype: torch.dtype,
    target_features: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> SequencePairs:
    """Sequences that start with ``prompt`` as EAGLE pairs: ``next_tokens [B, S]`` (``x_{t+1}``),
    ``features [B, S, H]`` (``f_t``), pairs ``t < num_pairs [B]``; the prompt's image tokens among
    them are the visual path's (``dtype``: the head's)."""
    width = next_tokens.shape[1]
    device = next_tokens.device
    rope, offsets = _rope_ids(target, prompt, width)
    tokens = F.pad(prompt.tokens.to(device), (0, width - prompt.tokens.shape[1]), value=-1)[:, :width]
    is_image = (tokens == target.image_token_id) & (torch.arange(width, device=device)[None] < num_pairs[:, None])
    return SequencePairs(
        next_tokens=next_tokens,
        features=features,
        rope=rope,
        num_pairs=num_pairs,
        rope_offsets=offsets,
        image=_image_tokens(target, prompt, is_image, features, rope, dtype),
        is_image=is_image,
        target_features=target_features,
        valid=valid,
    )


def prompt_sequence(target: VLMTarget, prompt: VLMPrompt, features: torch.Tensor, dtype: torch.dtype) -> SequencePairs:
    """The prompt's pairs ``t < L - 1`` (the last one is the drafter's first catch-up) from the
    prefill features ``[B, P, H]``."""
    tokens = prompt.tokens.to(features.device)
    next_tokens = F.pad(tokens[:, 1:], (0, 1))
    return sequence_pairs(target, prompt, next_tokens, features, prompt.lengths.to(features.device) - 1, dtype)


def lay_out(head: VLMEagleHead, seq: SequencePairs) -> DrafterLayout:
    """Merge the text pairs and the visual path's image entries of every row by sequence position
    (a row's entries fill slots ``0 .. lengths - 1``)."""
    batch, width = seq.next_tokens.shape
    device = seq.next_tokens.device
    dtype = head.fc.weight.dtype
    image = seq.image
    entries = head.visual(image)
    text = (torch.arange(width, device=device)[None] < seq.num_pairs[:, None]) & ~seq.is_image  # [B, S]
    text_row, text_pos = torch.nonzero(text, as_tuple=True)
    row = torch.cat([text_row, image.row[entries.token]])  # [E] every entry's row
    key = torch.cat([text_pos, image.position[entries.token]])  # [E] its sequence position
    order = torch.argsort(row * (width + 1) + key)
    lengths = torch.bincount(row, minlength=batch)  # [B]
    slot = torch.empty_like(order)
    slot[order] = torch.arange(order.shape[0], device=device) - (lengths.cumsum(0) - lengths)[row[order]]
    num_slots = int(lengths.max()) if batch else 0  # deliberate sync: layout, once per prompt
    token_embeds = F.embedding(
        seq.next_tokens[text_row, text_pos].clamp(min=0), head.target_modules.embed.weight.detach()
    )

    def scatter(text_values: torch.Tensor, image_values: torch.Tensor) -> torch.Tensor:
        values = torch.cat([text_values.to(dtype), image_values.to(dtype)])  # [E, H]
        out = values.new_zeros(batch, num_slots, values.shape[-1])
        out[row, slot] = values
        return out

    rope = torch.zeros(3, batch, num_slots, dtype=torch.long, device=device)
    rope[:, row, slot] = torch.cat([seq.rope[:, text_row, text_pos], image.rope[entries.token].T], 1)
    source = torch.full((batch, num_slots), -1, dtype=torch.long, device=device)
    source[text_row, slot[: text_row.shape[0]]] = text_pos
    bias, text_bias = None, torch.zeros(batch, head.config.hidden_size, dtype=dtype, device=device)
    if entries.span_global is not None and image.num_spans:
        glob = entries.span_global.to(dtype)  # [S, H]
        text_bias = text_bias.index_add(0, image.span_row, glob)  # every image of the row
        # A text entry gets the features of its row's images that start before it: a per-row
        # running sum, indexed by the last such image (spans are in (row, position) order).
        running = glob.cumsum(0) - (text_bias.cumsum(0) - text_bias)[image.span_row]  # [S, H]
        span_key = image.span_row * (width + 1) + image.position[image.span_first]
        last = torch.searchsorted(span_key, text_row * (width + 1) + text_pos) - 1  # [T]
        own = (last >= 0) & (image.span_row[last.clamp(min=0)] == text_row)
        text_values = torch.where(own[:, None], running[last.clamp(min=0)], 0)
        bias = scatter(text_values, torch.zeros_like(entries.embeds))  # [B, M, H]
    return DrafterLayout(
        embeds=scatter(token_embeds, entries.embeds),
        features=scatter(seq.features[text_row, text_pos], entries.features),
        rope=rope,
        bias=bias,
        source=source,
        lengths=lengths,
        text_bias=text_bias,
    )
