"""``mmspec eval`` with open_clip (CLIP score, CLIP-feature FID) on a tiny random open_clip model.

open_clip is an optional extra (``mmspec[clip]``) and needs torchvision; these tests are skipped
where open_clip is not installed (the CI's dev install). On the CPU development machines
torchvision 0.28's compiled ops need CUDA libraries; ``tests/conftest.py`` works around that for
the test session (see ``_torchvision_without_cuda_ops``). Run them with
open_clip on the path, e.g. ``pip install --target DIR --no-deps torchvision==0.28.0
open_clip_torch timm ftfy wcwidth`` and ``PYTHONPATH=DIR pytest tests/pipelines/llamagen/test_eval_open_clip.py``
(a separate directory: a broken torchvision in the main environment also breaks transformers' VLM
imports).
"""

from __future__ import annotations

import json

import pytest
import torch

from mmspec.app.cli import main
from mmspec.app.evaluation import OpenCLIPFeatures, clip_score, evaluate_llamagen
from mmspec.pipelines.llamagen import LlamaGenPipeline

from ...conftest import tiny_llamagen

#: A tiny CLIP: 32-pixel images, one vision and one text layer, 32-d joint space.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """``(config .json path, weights path)`` of a random tiny open_clip model saved like a user's checkpoint."""
    open_clip = pytest.importorskip("open_clip", reason='open_clip is not installed (pip install "mmspec[clip]")')
    folder = tmp_path_factory.mktemp("clip")
    config = folder / "mmspec-tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    model = open_clip.create_model("mmspec-tiny-clip", pretrained=None)
    torch.save(model.state_dict(), folder / "weights.pt")
    return config, folder / "weights.pt"


def test_open_clip_features_load_the_user_weights(tiny_clip):
    config, weights = tiny_clip
    clip = OpenCLIPFeatures(str(config), weights)
    assert clip.name == "open_clip:mmspec-tiny-clip" and clip.size == 32
    state = torch.load(weights, weights_only=True)
    for name, value in clip.model.state_dict().items():
        assert torch.equal(value, state[name]), name  # the file's weights, not a fresh random init
    images = torch.rand(3, 3, 16, 16)
    features = clip(images)
    assert features.shape == (3, 32)
    # the same model by hand: resize to its input size, CLIP's normalisation, image tower
    x = torch.nn.functional.interpolate(images, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    mean = torch.tensor(clip.model.visual.image_mean)[:, None, None]
    std = torch.tensor(clip.model.visual.image_std)[:, None, None]
    with torch.no_grad():
        assert torch.allclose(features, clip.model.encode_image((x - mean) / std), atol=1e-6)
    texts = clip.text(["a photo of a cat", "a photo of a dog", "a photo of a cat"])
    assert texts.shape == (3, 32)
    assert torch.equal(texts[0], texts[2]) and not torch.equal(texts[0], texts[1])
    assert clip_score(features, texts) == pytest.approx(
        float(100 * torch.nn.functional.cosine_similarity(features, texts).clamp(min=0).mean())
    )


def test_open_clip_errors(tiny_clip, tmp_path):
    config, weights = tiny_clip
    with pytest.raises(FileNotFoundError, match="CLIP weights"):
        OpenCLIPFeatures(str(config), tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="model config"):
        OpenCLIPFeatures(str(tmp_path / "missing.json"), weights)


def test_eval_reports_clip_score_and_clip_fid(tiny_clip, tmp_path):
    config, weights = tiny_clip
    gpt, vq = tiny_llamagen()
    pipe = LlamaGenPipeline(target=gpt, vq=vq)
    pipe.set_progress_bar_config(disable=True)
    clip = OpenCLIPFeatures(str(config), weights)
    report = evaluate_llamagen(
        pipe, [], [0, 1, 2, 3], batch_size=4, features=clip, clip=clip, class_names=["cat", "dog", "car", "tree"]
    )
    assert report["features"] == "open_clip:mmspec-tiny-clip"
    assert 0 <= report["baseline"]["clip_score"] <= 100

    # the command line: class names from the classes file saved beside the pipeline
    pipe.save_pretrained(tmp_path / "pipe")
    classes = [{"label": i, "char": "?", "name": n} for i, n in enumerate(["cat", "dog", "car", "tree"])]
    (tmp_path / "pipe" / "classes.json").write_text(json.dumps(classes))
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tmp_path / "pipe"),
                "--method",
                "sjd",
                "--num-images",
                "4",
                "--batch-size",
                "4",
                "--features",
                "clip",
                "--clip-model",
                str(config),
                "--clip-weights",
                str(weights),
                "--output-dir",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    saved = json.loads((out / "report.json").read_text())
    assert saved["features"] == "open_clip:mmspec-tiny-clip"
    assert 0 <= saved["baseline"]["clip_score"] <= 100 and 0 <= saved["methods"][0]["clip_score"] <= 100
    assert saved["methods"][0]["fid_vs_baseline"] >= 0
