"""Relaxed acceptance in the VLM pipeline: a rule instance over the language model's token
embedding (GSD's ``embedding="tokens"`` choice; LANTERN's latent neighbourhoods are a VQ-codebook
notion, so only GSD is offered for text)."""

from __future__ import annotations

import torch

from mmspec.drafters import ModelDrafter
from mmspec.pipelines.vlm import VLMPipeline
from mmspec.relaxed import GSDAcceptance

from .test_vlm import CASES, noisy_decoder, tiny_pipeline


def _run(pipe, drafter, acceptance, seed=0):
    images, prompts = CASES["batch"]
    return VLMPipeline(pipe.target, pipe.processor, drafter=drafter)(
        images,
        prompts,
        max_new_tokens=16,
        num_draft_tokens=3,
        temperature=1.0,
        acceptance=acceptance,
        generator=torch.Generator().manual_seed(seed),
    )


def test_gsd_over_token_embeddings_in_the_vlm_pipeline():
    pipe = tiny_pipeline("llava")
    drafter = ModelDrafter(pipe.target.with_decoder(noisy_decoder(pipe.target.decoder, 0.3)))
    embeddings = pipe.target.decoder.tok_embeddings.weight.detach()  # [V, C]
    exact = _run(pipe, drafter, "exact")
    single = _run(pipe, drafter, GSDAcceptance(embeddings, group_size=1))
    assert torch.equal(single.token_ids, exact.token_ids)  # G = 1 is exact acceptance, draw for draw
    assert float(single.stats.moved_mass_sum) == 0
    grouped = _run(pipe, drafter, GSDAcceptance(embeddings, group_size=8, prob_threshold=1.0, dist_threshold=1e9))
    summary = grouped.stats.summary()
    assert 0 < summary["mean_tvd_per_token"] <= summary["max_tvd_per_token"] <= 1  # it did relax, and reports it
    assert grouped.stats.mean_accepted > exact.stats.mean_accepted
    assert all(len(text) > 0 for text in grouped.text)
