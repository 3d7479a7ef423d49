"""Shared tiny components (diffusers' get_dummy_components pattern) and fixture paths."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch


def _torchvision_without_cuda_ops() -> list[torch.library.Library]:
    """Test set-up workaround (ENVIRONMENT.md), not library code: where torchvision is installed
    but its compiled ops need CUDA libraries this machine lacks (torchvision 0.28 on the CPU
    machines), ``import torchvision`` fails with "operator torchvision::nms does not exist", and so
    does every transformers / diffusers import that probes torchvision. Registering the two op
    schemas makes the Python parts importable (the ops themselves still fail; nothing here uses
    them). Runs before anything imports transformers; a no-op without torchvision or with a working
    one. Returns the registrations, which must stay alive."""
    if importlib.util.find_spec("torchvision") is None:
        return []
    try:
        import torchvision  # noqa: F401
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]  # the failed import left half-initialised modules behind
        library = torch.library.Library("torchvision", "DEF")
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        return [library]
    return []


_TORCHVISION_SCHEMAS = _torchvision_without_cuda_ops()

from mmspec.modeling import DecoderConfig, DecoderLM  # noqa: E402  (after the torchvision set-up)

REPO = Path(__file__).resolve().parents[1]

# Tiny models are dominated by per-op overhead; with 2 threads on a 2-core CI runner (or a busy
# one) every op pays thread synchronisation and tests run far slower. One thread for the suite.
torch.set_num_threads(1)


def fixtures_dir() -> Path:
    """``$MMSPEC_FIXTURES`` or ``<repo>/../shared/fixtures`` (the checked-out shared folder)."""
    return Path(os.environ.get("MMSPEC_FIXTURES", REPO.parent / "shared" / "fixtures"))


def tiny_lm(
    vocab_size: int = 48, dim: int = 32, n_layer: int = 2, n_head: int = 4, seed: int = 0, sharpness: float = 8.0
) -> DecoderLM:
    """A random Llama-architecture LM with sharp (low-entropy) logits, in eval mode."""
    torch.manual_seed(seed)
    model = DecoderLM(DecoderConfig(vocab_size=vocab_size, dim=dim, n_layer=n_layer, n_head=n_head, multiple_of=16))
    with torch.no_grad():
        model.output.weight.mul_(sharpness)  # peaked distributions, like a trained model
    return model.eval()


def noisy_copy(model: torch.nn.Module, noise: float, seed: int = 1) -> torch.nn.Module:
    """A drafter that agrees with ``model`` often but not always (ragged acceptance): a copy of any
    decoder (``DecoderLM``, a VLM's converted ``VLMDecoder``, ...) with Gaussian noise on its weights."""
    import copy as copying

    copy = copying.deepcopy(model)
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
def no_model_loading(monkeypatch):
    """Fail the test if a command gets as far as loading a model (settings wrong for every item must
    stop it before: docs/reliability.md)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    from mmspec.app import generate_llamagen
    from mmspec.pipelines.llamagen import LlamaGenPipeline
    from mmspec.pipelines.vlm import VLMPipeline
    from mmspec.training import eagle

    monkeypatch.setattr(generate_llamagen, "load_llamagen", refuse)
    monkeypatch.setattr(LlamaGenPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(VLMPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(eagle, "load_lm_target", refuse)


@pytest.fixture
def target() -> DecoderLM:
    return tiny_lm()


@pytest.fixture
def draft_model(target) -> DecoderLM:
    return noisy_copy(target, noise=0.6)


def tiny_llamagen(
    vocab_size: int = 16,
    grid: int = 3,
    num_classes: int = 5,
    dim: int = 32,
    n_layer: int = 2,
    seed: int = 0,
    sharpness: float = 3.0,
    model_type: str = "c2i",
):
    """A random LlamaGen GPT (c2i or t2i) + VQ pair small enough for CPU tests (4x4-pixel patches)."""
    from mmspec.pipelines.llamagen import LlamaGenGPT, LlamaGenVQ

    torch.manual_seed(seed)
    gpt = LlamaGenGPT(
        dim=dim,
        n_layer=n_layer,
        n_head=4,
        multiple_of=32,
        num_classes=num_classes,
        vocab_size=vocab_size,
        block_size=grid * grid,
        model_type=model_type,
        caption_dim=24,
        cls_token_num=1 if model_type == "c2i" else 6,
    )
    with torch.no_grad():  # the official init zeroes the LM head (uniform logits): give it structure
        for p in gpt.parameters():
            p.normal_(0, 1 / max(p.shape[-1], 1) ** 0.5) if p.dim() > 1 else p.fill_(1.0)
        gpt.output.weight.mul_(sharpness)
    vq = LlamaGenVQ(
        codebook_size=vocab_size,
        codebook_embed_dim=4,
        encoder_ch_mult=(1, 1),
        decoder_ch_mult=(1, 1),
        z_channels=32,
        ch=32,
        num_res_blocks=1,
    )
    return gpt.eval(), vq.eval()


def assert_rows_follow(rows: torch.Tensor, exact: dict[tuple, float]) -> None:
    """The rows ``[n, L]`` (one sample each) follow the exact joint law ``exact`` of ``L`` tokens.

    The total-variation distance between the empirical and exact laws must stay under 3x the
    expected TVD of an exact sampler at this sample size (``E|p_hat - p| ~ sqrt(2 p (1-p) / (pi n))``),
    a tolerance that shrinks as 1/sqrt(n). Samples outside the support also fail it.
    """
    import math

    n = rows.shape[0]
    counts: dict[tuple, int] = {}
    for row in rows.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert set(counts) <= set(exact), f"samples outside the support: {sorted(set(counts) - set(exact))[:5]}"
    tvd = 0.5 * sum(abs(counts.get(s, 0) / n - p) for s, p in exact.items())
    expected = 0.5 * sum(math.sqrt(2 * p * (1 - p) / (math.pi * n)) for p in exact.values())
    assert tvd < 3 * expected, (tvd, expected)


def recording(drafter_cls: type) -> type:
    """A subclass of ``drafter_cls`` that keeps every step's committed history, new-token counts and
    draft in ``records``, to compare incremental drafting with the head run from scratch."""

    class Recording(drafter_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.records = []

        def draft(self, ctx, num_draft_tokens, generator):
            draft = super().draft(ctx, num_draft_tokens, generator)
            self.records.append((ctx.history.clone(), ctx.history_lengths.clone(), ctx.num_new.clone(), draft))
            return draft

    Recording.__name__ = f"Recording{drafter_cls.__name__}"
    return Recording


def tiny_mar(seed: int = 0, **overrides):
    """A random MAR small enough for CPU tests: 64 px, 16x VAE stride -> a 4x4 token grid of
    4-channel tokens, 5-step diffusion head. ``overrides`` change any ``MARModel`` field."""
    from mmspec.pipelines.mar import MARModel

    fields = dict(
        img_size=64,
        vae_stride=16,
        patch_size=1,
        encoder_embed_dim=32,
        encoder_depth=1,
        encoder_num_heads=2,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
        vae_embed_dim=4,
        class_num=5,
        buffer_size=2,
        diffloss_d=1,
        diffloss_w=32,
        num_sampling_steps="5",
    )
    fields.update(overrides)
    torch.manual_seed(seed)
    return MARModel(**fields).eval()


def tiny_mar_vae(seed: int = 0, embed_dim: int = 4):
    """A random KL VAE for :func:`tiny_mar` (five levels: 16x down-sampling, like KL-16; 32 channels)."""
    from mmspec.pipelines.mar import MARAutoencoderKL

    torch.manual_seed(seed)
    return MARAutoencoderKL(embed_dim=embed_dim, ch=32, ch_mult=(1, 1, 1, 1, 2)).eval()


def tiny_video_model(seed: int = 0, **overrides):
    """A random block-causal video transformer: 3 classes, 4-channel 4x4 latents (2x2 patches),
    2-frame blocks, up to 6 frames. Weights are random everywhere (adaLN-Zero's zero initialisation
    would make every block the identity and hide masking mistakes)."""
    from mmspec.pipelines.video import BlockCausalVideoTransformer

    fields = dict(
        num_classes=3,
        latent_channels=4,
        latent_size=4,
        patch_size=2,
        frames_per_block=2,
        max_frames=6,
        dim=32,
        depth=2,
        heads=2,
        class_names=["red apple", "grinning face", "panda face"],
    )
    fields.update(overrides)
    torch.manual_seed(seed)
    model = BlockCausalVideoTransformer(**fields)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.eval()


def tiny_video_vae(seed: int = 0, image_size: int = 16):
    """A random frame VAE making 4-channel 4x4 latents from 16-pixel frames (for :func:`tiny_video_model`)."""
    from mmspec.pipelines.video import FrameAutoencoderKL

    torch.manual_seed(seed)
    return FrameAutoencoderKL(image_size=image_size, latent_channels=4, channels=8).eval()


#: The environment of an ``mmspec`` process a test starts: one torch thread (the machine is shared).
CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_mmspec(
    cli_args: list[str],
    cwd: Path | str | None = None,
    timeout: float = 120,
    check: bool = False,
    launcher: list[str] | tuple[str, ...] = (),
):
    """``mmspec <cli_args>`` as a new process (``python [launcher] -m mmspec.app.cli``) with
    :data:`CLI_ENV`; returns the ``subprocess.CompletedProcess`` (output captured as text)."""
    import subprocess

    return subprocess.run(
        [sys.executable, *launcher, "-m", "mmspec.app.cli", *cli_args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=CLI_ENV,
        cwd=cwd,
        check=check,
    )


def run_distributed(cli_args: list[str], cwd: Path, nproc: int = 2, timeout: int = 240):
    """``mmspec <cli_args>`` in ``nproc`` real processes started together by ``torch.distributed.run``
    (what ``accelerate launch`` does), on a free local port, one torch thread each; returns the
    ``subprocess.CompletedProcess`` (output captured as text)."""
    import socket

    with socket.socket() as sock:  # a free port for the processes' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1"]
    return run_mmspec(cli_args, cwd, timeout, launcher=[*launcher, "--master_port", str(port)])
