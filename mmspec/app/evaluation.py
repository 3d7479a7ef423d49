"""Quality next to speed (``mmspec eval``): each configuration against its own baseline, same seeds.

For every method: accepted length, steps and wall time (from :class:`~mmspec.stats.SpecStats`), the
total variation the acceptance rule actually incurred per token (lossy rules), FID against the
baseline's images with a pluggable feature extractor, CLIP score when CLIP weights are given, and an
image grid (rows: baseline, then each method, labelled on the left; same labels and seeds in every column). A second
baseline run on other seeds gives FID's noise floor at this sample size: a method whose FID is
within it is indistinguishable from the baseline by this measure.

Feature extractors (``ImageFeatures``): the offline default is the pipeline's own VQ encoder
(:class:`VQEncoderFeatures`; trained on the model's data, NOT comparable to Inception-FID numbers
in papers); a TorchScript network from a user-given path (e.g. an exported Inception-v3) via
:class:`TorchScriptFeatures`; open_clip image towers via :class:`OpenCLIPFeatures`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .jobs import parse_key_values
from .visualize import image_grid


class ImageFeatures(Protocol):
    """``features(images [B, 3, H, W] in [0, 1]) -> [B, D]``; ``name`` goes into reports."""

    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class VQEncoderFeatures:
    """Spatial mean and standard deviation of a VQ encoder's output: ``[B, 2 * z_channels]``."""

    name = "vq-encoder"

    def __init__(self, vq: Any) -> None:
        self.vq = vq

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        z = self.vq.encoder(images.to(self.vq.device, self.vq.dtype) * 2 - 1).float()  # [B, C, h, w]
        return torch.cat([z.mean((2, 3)), z.std((2, 3))], dim=1)


class TorchScriptFeatures:
    """A TorchScript feature network from ``path`` (inputs resized to ``size``, ImageNet-normalised
    if ``normalize``); works offline with weights the user provides."""

    def __init__(self, path: str | Path, size: int = 299, normalize: bool = True) -> None:
        self.net = torch.jit.load(str(path), map_location="cpu").eval()
        self.size, self.normalize = size, normalize
        self.name = f"torchscript:{Path(path).name}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float().cpu(), size=(self.size, self.size), mode="bilinear", align_corners=False)
        if self.normalize:
            mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
            std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
            x = (x - mean) / std
        return self.net(x).flatten(1).float()


class OpenCLIPFeatures:
    """An open_clip model (``pip install "mmspec[clip]"``) with weights from a user-given file:
    image features for FID and both towers for CLIP score.

    Args:
        model_name: an open_clip architecture name (``"ViT-B-32"``), or the path of an open_clip
            model-config ``.json`` file (registered with ``open_clip.add_model_config``; the model
            is then named after the file's stem) for architectures open_clip does not list.
        weights: the checkpoint file (open_clip's ``pretrained=`` path: a state dict).

    Raises:
        ImportError: open_clip is not installed (the message gives the install command).
        FileNotFoundError: ``weights`` or the model config does not exist.
        ValueError: an unknown architecture, or weights of another one.
    """

    def __init__(self, model_name: str, weights: str | Path) -> None:
        from ..pipelines.video.scorer_clip import load_open_clip  # imports open_clip: only when CLIP is asked for

        clip = load_open_clip(model_name, weights)
        self.model, self.preprocess, self.tokenizer = clip.model, clip.preprocess, clip.tokenizer
        model_name = clip.name
        self.size = self.model.visual.image_size
        self.size = self.size[0] if isinstance(self.size, (tuple, list)) else self.size
        self.name = f"open_clip:{model_name}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float().cpu(), size=(self.size, self.size), mode="bicubic", align_corners=False)
        mean = torch.tensor(self.model.visual.image_mean or (0.48145466, 0.4578275, 0.40821073))[:, None, None]
        std = torch.tensor(self.model.visual.image_std or (0.26862954, 0.26130258, 0.27577711))[:, None, None]
        return self.model.encode_image((x.clamp(0, 1) - mean) / std).float()

    @torch.no_grad()
    def text(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts)).float()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features ``a [N, D]`` and ``b [M, D]``
    (Heusel et al. 2017, eq. 6): ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``."""
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("FID needs at least 2 images per set")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    vals, vecs = torch.linalg.eigh(cov_a)
    sqrt_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    middle = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    distance = float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * middle)
    return max(distance, 0.0)  # a squared distance: round-off leaves about -1e-15 for identical sets


def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> float:
    """CLIP score (Hessel et al. 2021): ``100 * mean(max(cos(image, text), 0))`` over matched pairs."""
    cos = F.cosine_similarity(image_features.float(), text_features.float(), dim=-1)
    return float(100 * cos.clamp(min=0).mean())


@dataclass
class EvalMethod:
    """One configuration, ``SPECULATIVE[:ACCEPTANCE[:RULE_OPTIONS[:METHOD_OPTIONS]]]``: ``"sjd"``,
    ``"sjd:lantern:delta=0.1,k=100"``, ``"eagle:exact"``, ``"mulo::tau=0.02:upsampler=learned"``...
    (an empty or missing rule = the method's own rule; options are ``key=value`` lists)."""

    name: str
    speculative: str | None
    acceptance: str | None = None
    acceptance_options: dict = field(default_factory=dict)
    speculative_options: dict = field(default_factory=dict)
    #: call settings this configuration changes (e.g. MAR's baseline at ``num_iter / gamma``)
    sampling: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> EvalMethod:
        parts = spec.split(":")
        if not parts[0] or len(parts) > 4:
            raise ValueError(f"method spec {spec!r} must be SPECULATIVE[:ACCEPTANCE[:key=value,...[:key=value,...]]]")
        parts += [""] * (4 - len(parts))
        rule_options, method_options = (
            parse_key_values([p for p in part.split(",") if p], f"method {spec!r}") for part in parts[2:]
        )
        speculative = None if parts[0] == "none" else parts[0]
        return cls(spec, speculative, parts[1] or None, rule_options, method_options)


def _run(pipe, method: EvalMethod | None, labels, seeds, batch_size, sampling: dict) -> tuple[torch.Tensor, dict]:
    """Images ``[N, 3, H, W]`` and summed stats for ``labels[i]`` with seed ``seeds[i]``, in batches
    whose generator is seeded by the batch's first seed (same batches for every method)."""
    images, steps, accepted, row_steps, tvd_sum, tvd_tokens, tvd_max, seconds = [], 0, 0, 0, 0.0, 0, 0.0, 0.0
    committed = 0.0  # tokens per step x row steps: each stats type defines tokens per step (MuLo-SD: grid / forwards)
    proposed, kept = 0, 0
    if method is not None:
        sampling = {**sampling, **method.sampling}
    for start in range(0, len(labels), batch_size):
        t0 = time.perf_counter()
        out = pipe(
            class_labels=labels[start : start + batch_size],
            output_type="pt",
            generator=torch.Generator(pipe.target.device).manual_seed(seeds[start]),
            speculative=None if method is None else method.speculative,
            acceptance=None if method is None else method.acceptance,
            acceptance_options=None if method is None else dict(method.acceptance_options),
            speculative_options=None if method is None else dict(method.speculative_options) or None,
            **sampling,
        )
        seconds += time.perf_counter() - t0
        images.append(out.images.cpu())
        s = out.stats
        steps += s.steps
        accepted += int(s.row_accepted.sum())
        row_steps += int(s.row_steps.sum())
        committed += s.mean_tokens_per_step * int(s.row_steps.sum())
        tvd_sum += float(s.moved_mass_sum)
        tvd_tokens += int(s.moved_mass_tokens)
        tvd_max = max(tvd_max, float(s.moved_mass_max))
        proposed += int(s.proposed_at_depth.sum())
        kept += int(s.accepted_at_depth.sum())
    return torch.cat(images), {
        "acceptance_rate": kept / proposed if proposed else None,
        "steps": steps,
        "wall_time_s": seconds,
        "mean_accepted_without_bonus": accepted / max(row_steps, 1),
        "mean_tokens_per_step_with_bonus": committed / max(row_steps, 1),
        "mean_tvd_per_token": tvd_sum / tvd_tokens if tvd_tokens else 0.0,
        "max_tvd_per_token": tvd_max,
    }


def evaluate_llamagen(
    pipe: Any,
    methods: list[EvalMethod],
    class_labels: list[int],
    seed: int = 0,
    batch_size: int = 8,
    features: ImageFeatures | None = None,
    clip: OpenCLIPFeatures | None = None,
    class_names: list[str] | None = None,
    sampling: dict | None = None,
    out_dir: Path | None = None,
    grid_columns: int = 8,
) -> dict:
    """Run the baseline, a second baseline on other seeds (FID noise floor) and every method on the
    same ``class_labels`` and seeds; return (and write to ``out_dir``) the report and image grid."""
    features = features or VQEncoderFeatures(pipe.vq)
    sampling = sampling or {}
    seeds = [seed + i for i in range(len(class_labels))]
    base_images, base_stats = _run(pipe, None, class_labels, seeds, batch_size, sampling)
    floor_images, _ = _run(pipe, None, class_labels, [s + 10_000 for s in seeds], batch_size, sampling)
    base_features = features(base_images)
    report = {
        "features": features.name,
        "num_images": len(class_labels),
        "sampling": sampling,
        "baseline": base_stats,
        "fid_noise_floor": frechet_distance(features(floor_images), base_features),
        "methods": [],
    }
    texts = clip.text([f"a photo of {class_names[c]}" for c in class_labels]) if clip and class_names else None
    if texts is not None:
        report["baseline"]["clip_score"] = clip_score(clip(base_images), texts)
    rows = [base_images[:grid_columns]]
    for method in tqdm(methods, desc="eval", unit="method"):
        images, stats = _run(pipe, method, class_labels, seeds, batch_size, sampling)
        stats["fid_vs_baseline"] = frechet_distance(features(images), base_features)
        stats["speedup_vs_baseline"] = base_stats["wall_time_s"] / max(stats["wall_time_s"], 1e-9)
        if texts is not None:
            stats["clip_score"] = clip_score(clip(images), texts)
        report["methods"].append({"method": asdict(method), **stats})
        rows.append(images[:grid_columns])
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        import PIL.Image

        tiles = [
            PIL.Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
            for row in rows
            for img in row
        ]
        labels = ["baseline", *(method.name for method in methods)]  # one row each, as in the report
        image_grid(tiles, cols=min(grid_columns, len(class_labels)), row_labels=labels).save(out_dir / "grid.png")
    return report


def format_report(report: dict) -> str:
    """Markdown table: speed and quality side by side."""
    lines = [
        f"features: {report['features']}, {report['num_images']} images; FID noise floor "
        f"(baseline vs baseline on other seeds): {report['fid_noise_floor']:.3f}",
        "",
        "| method | steps | accepted/step (w/o bonus) | wall s | speedup | mean TVD/token | max TVD | FID vs baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    b = report["baseline"]
    lines.append(f"| baseline | {b['steps']} | 0.00 | {b['wall_time_s']:.2f} | 1.00x | 0 | 0 | 0 |")
    for m in report["methods"]:
        lines.append(
            f"| {m['method']['name']} | {m['steps']} | {m['mean_accepted_without_bonus']:.2f} | "
            f"{m['wall_time_s']:.2f} | {m['speedup_vs_baseline']:.2f}x | {m['mean_tvd_per_token']:.4f} | "
            f"{m['max_tvd_per_token']:.4f} | {m['fid_vs_baseline']:.3f} |"
        )
    return "\n".join(lines)
