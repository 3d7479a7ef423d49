"""Training recipe of the embedded video reference pair (``mmspec train-video``): a frame VAE, a
block-causal video transformer target and a smaller draft, on offline emoji clips
(:mod:`mmspec.data.emoji_video`).

Stages (``--stage vae|target|draft|all --out DIR``): ``vae`` trains :class:`FrameAutoencoderKL`
(L1 + MSE reconstruction + a small KL term) and sets its ``scaling_factor`` to 1 / the latents'
standard deviation; ``target`` and ``draft`` encode every clip once with that VAE and train a
:class:`BlockCausalVideoTransformer` each with rectified-flow velocity loss under teacher forcing
(:meth:`~BlockCausalVideoTransformer.forward_teacher`: every block denoised at its own noise level
given the clean blocks before it, the context the KV cache holds at generation). Noise levels are
drawn half from the sampler's few-step grid (``1 - k / n``, ``n`` = ``sampler_steps``) and half
uniformly; the class is dropped (null class) with probability ``class_dropout`` for CFG. With every
stage in ``OUT``, ``OUT/pipeline`` holds the assembled :class:`VideoPipeline` (``save_pretrained``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.emoji_video import EmojiClipConfig, class_names, render_clips
from ..pipelines.video import BlockCausalVideoTransformer, FrameAutoencoderKL, VideoPipeline

STAGES = ("vae", "target", "draft")


@dataclass(frozen=True)
class VAETrainConfig:
    """The frame VAE stage: ``steps`` of ``batch_size`` random frames, Adam at ``lr`` (cosine decay)."""

    data: EmojiClipConfig = EmojiClipConfig()
    latent_channels: int = 4
    channels: int = 16
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    kl_weight: float = 1e-6
    seed: int = 0


@dataclass(frozen=True)
class VideoModelTrainConfig:
    """A video transformer stage (target or draft): the model's size and its optimisation."""

    data: EmojiClipConfig = EmojiClipConfig()
    dim: int = 64
    depth: int = 4
    heads: int = 4
    patch_size: int = 2
    frames_per_block: int = 2
    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    class_dropout: float = 0.1
    sampler_steps: int = 4
    seed: int = 0


def reference_configs(preset: str, seed: int = 0) -> dict[str, VAETrainConfig | VideoModelTrainConfig]:
    """Each stage's configuration: ``"reference"`` (the embedded pair) or ``"tiny"`` (tests: seconds)."""
    if preset == "reference":
        data = EmojiClipConfig(seed=seed)
        return {
            "vae": VAETrainConfig(data=data, seed=seed),
            "target": VideoModelTrainConfig(data=data, seed=seed),
            "draft": VideoModelTrainConfig(data=data, dim=32, depth=2, heads=2, seed=seed),
        }
    if preset == "tiny":
        data = EmojiClipConfig(image_size=16, num_frames=4, num_classes=2, num_clips=8, seed=seed)
        return {
            "vae": VAETrainConfig(data=data, channels=8, steps=3, batch_size=4, seed=seed),
            "target": VideoModelTrainConfig(data=data, dim=16, depth=2, heads=2, steps=3, batch_size=4, seed=seed),
            "draft": VideoModelTrainConfig(data=data, dim=8, depth=1, heads=2, steps=3, batch_size=4, seed=seed),
        }
    raise ValueError(f"unknown preset {preset!r}; choose 'reference' or 'tiny'")


def _cosine(step: int, steps: int) -> float:
    return 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / max(steps, 1))).item())


@torch.enable_grad()  # training must not depend on the caller's grad mode
def train_vae(config: VAETrainConfig, frames: torch.Tensor, device: str = "cpu") -> FrameAutoencoderKL:
    """Train the frame VAE on ``frames`` (uint8 ``[N, F, 3, H, W]``); returns it with its
    ``scaling_factor`` set."""
    torch.manual_seed(config.seed)
    images = frames.flatten(0, 1)  # [N*F, 3, H, W]
    vae = FrameAutoencoderKL(
        image_size=config.data.image_size, latent_channels=config.latent_channels, channels=config.channels
    ).to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    for step in tqdm(range(config.steps), desc="video vae"):
        for group in opt.param_groups:
            group["lr"] = config.lr * _cosine(step, config.steps)
        batch = images[torch.randint(0, images.shape[0], (config.batch_size,), generator=gen)]
        x = batch.to(device).float() / 127.5 - 1.0
        mean, logvar = vae.encode_moments(x)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        recon = vae.decoder(z)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + config.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval()
    with torch.no_grad():
        sample = images[torch.randperm(images.shape[0], generator=gen)[:1024]].to(device).float() / 127.5 - 1.0
        std = float(vae.encode_moments(sample)[0].std())
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae


@torch.no_grad()
def encode_clips(vae: FrameAutoencoderKL, frames: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Scaled latents ``[N, F, C, h, w]`` of uint8 clips ``[N, F, 3, H, W]``."""
    flat = frames.flatten(0, 1)
    out = [
        vae.encode(flat[i : i + batch_size].to(vae.device).float() / 127.5 - 1.0).cpu()
        for i in range(0, flat.shape[0], batch_size)
    ]
    return torch.cat(out).reshape(*frames.shape[:2], *vae.latent_shape)


@torch.enable_grad()
def train_video_model(
    config: VideoModelTrainConfig,
    latents: torch.Tensor,
    labels: torch.Tensor,
    names: list[str],
    device: str = "cpu",
    init: BlockCausalVideoTransformer | None = None,
) -> BlockCausalVideoTransformer:
    """Train a block-causal video transformer on clip latents ``[N, F, C, h, w]`` with ``labels [N]``
    (from scratch, or continuing from ``init``, a model of the same configuration)."""
    torch.manual_seed(config.seed)
    c, size = latents.shape[2], latents.shape[-1]
    fresh = BlockCausalVideoTransformer(
        num_classes=len(names),
        latent_channels=c,
        latent_size=size,
        patch_size=config.patch_size,
        frames_per_block=config.frames_per_block,
        max_frames=latents.shape[1],
        dim=config.dim,
        depth=config.depth,
        heads=config.heads,
        class_names=list(names),
    )
    if init is not None:
        differ = [k for k in fresh.config if not k.startswith("_") and init.config.get(k) != fresh.config[k]]
        if differ:
            raise ValueError(f"the model to continue from differs from this stage's configuration in {differ}")
        fresh.load_state_dict(init.state_dict())
    model = fresh.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(config.seed)
    num_blocks = latents.shape[1] // config.frames_per_block
    grid = torch.tensor([1.0 - k / config.sampler_steps for k in range(config.sampler_steps)])
    warmup = max(1, config.steps // 20)
    for step in tqdm(range(config.steps), desc=f"video model dim {config.dim}"):
        scale = min(1.0, (step + 1) / warmup) * _cosine(step, config.steps)
        for group in opt.param_groups:
            group["lr"] = config.lr * scale
        idx = torch.randint(0, latents.shape[0], (config.batch_size,), generator=gen)
        x0, y = latents[idx].to(device), labels[idx].to(device)
        drop = torch.rand(config.batch_size, generator=gen) < config.class_dropout
        y = torch.where(drop.to(device), torch.full_like(y, len(names)), y)
        uniform = torch.rand(config.batch_size, num_blocks, generator=gen)
        on_grid = grid[torch.randint(0, len(grid), (config.batch_size, num_blocks), generator=gen)]
        t = torch.where(torch.rand(config.batch_size, num_blocks, generator=gen) < 0.5, on_grid, uniform).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t_frames = t.repeat_interleave(config.frames_per_block, dim=1)[:, :, None, None, None]
        noisy = (1 - t_frames) * x0 + t_frames * noise
        v = model.forward_teacher(x0, noisy, t, y)
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval()


# ---------------------------------------------------------------------------------------- CLI
def add_train_video_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", choices=(*STAGES, "all"), default="all", help="what to train (default: all)")
    parser.add_argument("--out", required=True, help="output folder: OUT/<stage> (save_pretrained), OUT/pipeline")
    parser.add_argument("--preset", choices=("reference", "tiny"), default="reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="override the stage's steps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lr", type=float, default=None, help="override the stage's learning rate")
    parser.add_argument(
        "--init-from",
        default=None,
        help="target/draft: continue training from the model in INIT_FROM/<stage> (same configuration)",
    )


def train_video_command(args: argparse.Namespace) -> int:
    """``mmspec train-video``: run the chosen stages, then assemble ``OUT/pipeline`` when all exist."""
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    out = Path(args.out)
    configs = reference_configs(args.preset, args.seed)
    if args.steps is not None:
        configs = {k: dataclasses.replace(v, steps=args.steps) for k, v in configs.items()}
    if args.lr is not None:
        configs = {k: dataclasses.replace(v, lr=args.lr) for k, v in configs.items()}
    if args.init_from is not None and args.stage not in ("target", "draft"):
        raise SystemExit("--init-from continues a target or draft stage: use it with --stage target or --stage draft")
    stages = STAGES if args.stage == "all" else (args.stage,)
    if args.stage in ("target", "draft") and not (out / "vae").is_dir():
        raise SystemExit(f"stage {args.stage!r} needs a trained VAE in {out / 'vae'}: run --stage vae first")
    data = configs["vae"].data
    frames, labels = render_clips(data)
    names = class_names(data)
    for stage in stages:
        start = time.perf_counter()
        if stage == "vae":
            train_vae(configs["vae"], frames, args.device).save_pretrained(out / "vae")
        else:
            vae = FrameAutoencoderKL.from_pretrained(out / "vae").to(args.device).eval()
            latents = encode_clips(vae, frames)
            init = None
            if args.init_from is not None:
                init = BlockCausalVideoTransformer.from_pretrained(Path(args.init_from) / stage)
            model = train_video_model(configs[stage], latents, labels, names, args.device, init=init)
            model.save_pretrained(out / stage)
        seconds = time.perf_counter() - start
        record = {"stage": stage, "seconds": seconds, "config": dataclasses.asdict(configs[stage])}
        if args.init_from is not None:
            previous = Path(args.init_from) / stage / "training.json"
            record["continued_from"] = json.loads(previous.read_text()) if previous.is_file() else str(args.init_from)
        (out / stage / "training.json").write_text(json.dumps(record, indent=1))
        print(f"{stage}: {seconds:.1f} s -> {out / stage}")
    if all((out / stage).is_dir() for stage in STAGES):
        pipe = VideoPipeline(
            target=BlockCausalVideoTransformer.from_pretrained(out / "target"),
            vae=FrameAutoencoderKL.from_pretrained(out / "vae"),
            drafter=BlockCausalVideoTransformer.from_pretrained(out / "draft"),
        )
        pipe.save_pretrained(out / "pipeline")
        print(f"pipeline -> {out / 'pipeline'}")
    return 0
