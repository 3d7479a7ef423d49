"""Shared tiny components (diffusers' get_dummy_components pattern) and fixture paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mmspec.modeling import DecoderConfig, DecoderLM

REPO = Path(__file__).resolve().parents[1]


def fixtures_dir() -> Path:
    """``$MMSPEC_FIXTURES`` or ``<repo>/../shared/fixtures`` (the checked-out shared folder)."""
    return Path(os.environ.get("MMSPEC_FIXTURES", REPO.parent / "shared" / "fixtures"))


def tiny_lm(vocab_size: int = 48, dim: int = 32, n_layer: int = 2, n_head: int = 4, seed: int = 0, sharpness: float = 8.0) -> DecoderLM:
    """A random Llama-architecture LM with sharp (low-entropy) logits, in eval mode."""
    torch.manual_seed(seed)
    model = DecoderLM(DecoderConfig(vocab_size=vocab_size, dim=dim, n_layer=n_layer, n_head=n_head, multiple_of=16))
    with torch.no_grad():
        model.output.weight.mul_(sharpness)  # peaked distributions, like a trained model
    return model.eval()


def noisy_copy(model: DecoderLM, noise: float, seed: int = 1) -> DecoderLM:
    """A drafter that agrees with ``model`` often but not always (ragged acceptance)."""
    copy = DecoderLM(model.config)
    copy.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(noise * p.std() * torch.randn(p.shape, generator=g))
    return copy.eval()


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture
def target() -> DecoderLM:
    return tiny_lm()


@pytest.fixture
def draft_model(target) -> DecoderLM:
    return noisy_copy(target, noise=0.6)
