"""Training recipe of the embedded video reference pair (``mmspec train-video``): a frame VAE, a
block-causal video transformer target and a smaller draft, on offline emoji clips
(:mod:`mmspec.data.emoji_video`).

Stages (``--stage vae|target|draft|classifier|all --out DIR``): ``vae`` trains :class:`FrameAutoencoderKL`
(L1 + MSE reconstruction + a small KL term) and sets its ``scaling_factor`` to 1 / the latents'
standard deviation; ``target`` and ``draft`` encode every clip once with that VAE and train a
:class:`BlockCausalVideoTransformer` each with rectified-flow velocity loss under teacher forcing
(:meth:`~BlockCausalVideoTransformer.forward_teacher`: every block denoised at its own noise level
given the clean blocks before it, the context the KV cache holds at generation). Noise levels are
drawn half from the sampler's few-step grid (``1 - k / n``, ``n`` = ``sampler_steps``) and half
uniformly; the class is dropped (null class) with probability ``class_dropout`` for CFG.
``classifier`` trains the ``"classifier"`` frame scorer's :class:`FrameClassifier` on real clip
frames, ``vae_fraction`` of each batch shown through the VAE round-trip (the frames SDVG scores are
VAE decodes: the scorer should judge content, not the VAE's blur), and records its held-out
accuracy. With the vae, target and draft stages in ``OUT``, ``OUT/pipeline`` holds the assembled
:class:`VideoPipeline` (``save_pretrained``).
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
from ..pipelines.video.scorer_classifier import FrameClassifier
from .settings import check_train_video_settings

#: The stages the assembled pipeline is made of.
MODEL_STAGES = ("vae", "target", "draft")
STAGES = (*MODEL_STAGES, "classifier")
#: Held-out clips (the model card's evaluation seed): the classifier's accuracy is measured on them.
HELD_OUT_SEED = 1_000_003


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


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """The frame-classifier stage: ``steps`` of ``batch_size`` random frames (``vae_fraction`` of
    them as VAE round-trips), Adam at ``lr`` (cosine decay); ``held_out_clips`` clips of the held-out
    seed measure its accuracy."""

    data: EmojiClipConfig = EmojiClipConfig()
    channels: int = 32
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    vae_fraction: float = 0.5
    held_out_clips: int = 256
    seed: int = 0


StageConfig = VAETrainConfig | VideoModelTrainConfig | ClassifierTrainConfig


def reference_configs(preset: str, seed: int = 0) -> dict[str, StageConfig]:
    """Each stage's configuration: ``"reference"`` (the embedded pair) or ``"tiny"`` (tests: seconds)."""
    if preset == "reference":
        data = EmojiClipConfig(seed=seed)
        return {
            "vae": VAETrainConfig(data=data, seed=seed),
            "target": VideoModelTrainConfig(data=data, seed=seed),
            "draft": VideoModelTrainConfig(data=data, dim=32, depth=2, heads=2, seed=seed),
            "classifier": ClassifierTrainConfig(data=data, seed=seed),
        }
    if preset == "tiny":
        data = EmojiClipConfig(image_size=16, num_frames=4, num_classes=2, num_clips=8, seed=seed)
        return {
            "vae": VAETrainConfig(data=data, channels=8, steps=3, batch_size=4, seed=seed),
            "target": VideoModelTrainConfig(data=data, dim=16, depth=2, heads=2, steps=3, batch_size=4, seed=seed),
            "draft": VideoModelTrainConfig(data=data, dim=8, depth=1, heads=2, steps=3, batch_size=4, seed=seed),
            "classifier": ClassifierTrainConfig(
                data=data, channels=8, steps=3, batch_size=4, held_out_clips=4, seed=seed
            ),
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


@torch.no_grad()
def vae_round_trip(vae: FrameAutoencoderKL, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """uint8 frames ``[N, 3, H, W]`` encoded and decoded by ``vae``: uint8 ``[N, 3, H, W]``."""
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size].to(vae.device).float() / 127.5 - 1.0
        y = vae.decode(vae.encode(x)).float()
        out.append(((y + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu())
    return torch.cat(out)


@torch.no_grad()
def classifier_accuracy(classifier: FrameClassifier, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """On uint8 frames ``[N, 3, H, W]`` with ``labels [N]``: top-1 accuracy, the mean log-probability
    of the true class and the mean log-probability of the other classes."""
    logprobs = torch.cat(
        [
            torch.log_softmax(classifier(images[i : i + 512].float() / 255.0).float().cpu(), dim=-1)
            for i in range(0, images.shape[0], 512)
        ]
    )  # [N, K]
    true = logprobs.gather(1, labels[:, None])[:, 0]
    others = (logprobs.sum(1) - true) / (logprobs.shape[1] - 1)
    return {
        "accuracy": float((logprobs.argmax(1) == labels).float().mean()),
        "logprob_true_class": float(true.mean()),
        "logprob_other_classes": float(others.mean()),
    }


@torch.enable_grad()
def train_classifier(
    config: ClassifierTrainConfig,
    frames: torch.Tensor,
    labels: torch.Tensor,
    names: list[str],
    vae: FrameAutoencoderKL,
    device: str = "cpu",
) -> tuple[FrameClassifier, dict[str, dict[str, float]]]:
    """Train the frame classifier on clips ``frames`` (uint8 ``[N, F, 3, H, W]``) with ``labels [N]``;
    returns it and its held-out accuracy (:func:`classifier_accuracy` on real frames and on their VAE
    round-trips)."""
    torch.manual_seed(config.seed)
    images = frames.flatten(0, 1)  # [N*F, 3, H, W]
    frame_labels = labels.repeat_interleave(frames.shape[1])  # [N*F]
    round_trips = vae_round_trip(vae, images)
    classifier = FrameClassifier(
        image_size=config.data.image_size, num_classes=len(names), channels=config.channels, class_names=list(names)
    ).to(device)
    opt = torch.optim.Adam(classifier.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    for step in tqdm(range(config.steps), desc="frame classifier"):
        for group in opt.param_groups:
            group["lr"] = config.lr * _cosine(step, config.steps)
        idx = torch.randint(0, images.shape[0], (config.batch_size,), generator=gen)
        through_vae = torch.rand(config.batch_size, generator=gen) < config.vae_fraction
        batch = torch.where(through_vae[:, None, None, None], round_trips[idx], images[idx])
        logits = classifier(batch.to(device).float() / 255.0)
        loss = F.cross_entropy(logits, frame_labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    classifier.eval()
    held_out = dataclasses.replace(config.data, num_clips=config.held_out_clips, seed=HELD_OUT_SEED)
    test_frames, test_labels = render_clips(held_out)
    test_images = test_frames.flatten(0, 1)
    test_labels = test_labels.repeat_interleave(test_frames.shape[1])
    accuracy = {
        "real": classifier_accuracy(classifier, test_images, test_labels),
        "vae_round_trip": classifier_accuracy(classifier, vae_round_trip(vae, test_images), test_labels),
    }
    return classifier, accuracy


# ---------------------------------------------------------------------------------------- CLI
def add_train_video_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", choices=(*STAGES, "all"), default="all", help="what to train (default: all)")
    parser.add_argument("--out", required=True, help="output folder: OUT/<stage> (save_pretrained), OUT/pipeline")
    parser.add_argument("--preset", choices=("reference", "tiny"), default="reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="override the stage's steps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lr", type=float, default=None, help="override the stage's learning rate")
    parser.add_argument("--batch-size", type=int, default=None, help="override the stage's batch size")
    parser.add_argument(
        "--sampler-steps",
        type=int,
        default=None,
        help="target/draft: the few-step grid half of the training noise levels come from (1 - k / n)",
    )
    parser.add_argument(
        "--init-from",
        default=None,
        help="target/draft: continue training from the model in INIT_FROM/<stage> (same configuration)",
    )


def train_video_command(args: argparse.Namespace) -> int:
    """``mmspec train-video``: run the chosen stages, then assemble ``OUT/pipeline`` when all exist."""
    check_train_video_settings(args)
    if args.sampler_steps is not None and args.stage not in ("target", "draft"):
        raise SystemExit(
            "error: --sampler-steps sets a video model's training noise: use it with --stage target or --stage draft"
        )
    out = Path(args.out)
    configs = reference_configs(args.preset, args.seed)
    if args.steps is not None:
        configs = {k: dataclasses.replace(v, steps=args.steps) for k, v in configs.items()}
    if args.lr is not None:
        configs = {k: dataclasses.replace(v, lr=args.lr) for k, v in configs.items()}
    if args.batch_size is not None:
        configs = {k: dataclasses.replace(v, batch_size=args.batch_size) for k, v in configs.items()}
    if args.sampler_steps is not None:
        configs[args.stage] = dataclasses.replace(configs[args.stage], sampler_steps=args.sampler_steps)
    if args.init_from is not None and args.stage not in ("target", "draft"):
        raise SystemExit(
            "error: --init-from continues a target or draft stage: use it with --stage target or --stage draft"
        )
    stages = STAGES if args.stage == "all" else (args.stage,)
    if args.stage in ("target", "draft", "classifier") and not (out / "vae").is_dir():
        raise SystemExit(f"error: stage {args.stage!r} needs a trained VAE in {out / 'vae'}: run --stage vae first")
    data = configs["vae"].data
    frames, labels = render_clips(data)
    names = class_names(data)
    for stage in stages:
        start = time.perf_counter()
        extra = {}
        if stage == "vae":
            train_vae(configs["vae"], frames, args.device).save_pretrained(out / "vae")
        elif stage == "classifier":
            vae = FrameAutoencoderKL.from_pretrained(out / "vae").to(args.device).eval()
            classifier, extra["held_out"] = train_classifier(
                configs["classifier"], frames, labels, names, vae, args.device
            )
            classifier.save_pretrained(out / "classifier")
        else:
            vae = FrameAutoencoderKL.from_pretrained(out / "vae").to(args.device).eval()
            latents = encode_clips(vae, frames)
            init = None
            if args.init_from is not None:
                init = BlockCausalVideoTransformer.from_pretrained(Path(args.init_from) / stage)
            model = train_video_model(configs[stage], latents, labels, names, args.device, init=init)
            model.save_pretrained(out / stage)
        seconds = time.perf_counter() - start
        record = {"stage": stage, "seconds": seconds, "config": dataclasses.asdict(configs[stage]), **extra}
        if args.init_from is not None:
            previous = Path(args.init_from) / stage / "training.json"
            record["continued_from"] = json.loads(previous.read_text()) if previous.is_file() else str(args.init_from)
        (out / stage / "training.json").write_text(json.dumps(record, indent=1))
        print(f"{stage}: {seconds:.1f} s -> {out / stage}" + (f" held-out {extra['held_out']}" if extra else ""))
    if all((out / stage).is_dir() for stage in MODEL_STAGES):
        pipe = VideoPipeline(
            target=BlockCausalVideoTransformer.from_pretrained(out / "target"),
            vae=FrameAutoencoderKL.from_pretrained(out / "vae"),
            drafter=BlockCausalVideoTransformer.from_pretrained(out / "draft"),
        )
        pipe.save_pretrained(out / "pipeline")
        print(f"pipeline -> {out / 'pipeline'}")
    return 0
