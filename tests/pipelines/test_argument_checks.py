"""Loose arguments get clear errors (issue 18, items 6, 7, 9): wrong types and impossible values in
pipeline calls, upper bounds from what the model can use, and strict weight loading."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mmspec.drafters import EagleHead
from mmspec.drafters.eagle import EagleConfig, target_fingerprint
from mmspec.pipelines.llamagen import LlamaGenPipeline

from ..conftest import tiny_llamagen
from .vlm.test_vlm import image, tiny_pipeline, tiny_vlm


@pytest.fixture(scope="module")
def pipe():
    gpt, vq = tiny_llamagen()  # 3x3 grid: 9 tokens per image, 5 classes, 16 codes
    return LlamaGenPipeline(target=gpt, vq=vq)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"class_labels": [1.7]}, "class_labels must be integers, got \\[1.7\\]"),
        ({"class_labels": ["3"]}, "class_labels must be integers, got \\['3'\\]"),
        ({"class_labels": []}, "class_labels is empty"),
        ({"class_labels": [True]}, "class_labels must be integers"),
        ({"class_labels": torch.tensor([1.0])}, "class_labels must be integers"),
        ({"class_labels": [[1, 2]]}, "class_labels must be integers"),
        (
            {"class_labels": [0], "speculative": "sjd", "num_draft_tokens": 2.5},
            "num_draft_tokens must be an integer, got 2.5",
        ),
        (
            {"class_labels": [0], "speculative": "sjd", "num_draft_tokens": 10_000},
            "num_draft_tokens=10000 is more than the 9 tokens of an image: use at most 9",
        ),
        ({"class_labels": [0], "speculative": "sjd", "num_draft_tokens": 0}, "num_draft_tokens must be >= 1"),
        ({"class_labels": [0], "top_k": 100}, "top_k=100 is larger than the vocabulary"),
    ],
)
def test_llamagen_call_rejects_bad_arguments(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


def test_llamagen_accepts_integer_arrays_and_tensors(pipe):
    def tokens(labels):
        return pipe(class_labels=labels, generator=torch.Generator().manual_seed(3), output_type="pt").tokens

    want = tokens([1, 2])
    for labels in (np.array([1, 2]), torch.tensor([1, 2]), (np.int64(1), 2)):
        assert torch.equal(tokens(labels), want)
    assert torch.equal(tokens(np.int64(4)), tokens([4]))


def test_gsd_group_size_is_bounded_by_the_vocabulary(pipe):
    with pytest.raises(ValueError, match="group_size=1000000 is more than the 16 tokens"):
        pipe.acceptance_rule("gsd", group_size=10**6)
    assert pipe.acceptance_rule("gsd", group_size=16).group_size == 16


def test_vlm_call_checks(tmp_path):
    vlm = tiny_pipeline("llava")
    picture = image(0)
    with pytest.raises(ValueError, match="num_draft_tokens must be >= 0, got -1"):
        vlm(picture, "a?", num_draft_tokens=-1)
    with pytest.raises(ValueError, match="num_draft_tokens must be an integer"):
        vlm(picture, "a?", num_draft_tokens=2.5)
    with pytest.raises(ValueError, match="num_draft_tokens=100000 is more than the model's .* positions"):
        vlm(picture, "a?", num_draft_tokens=100_000)
    picture.save(tmp_path / "img.png")
    with pytest.raises(
        ValueError, match=r"got 2 prompts but a single image: pass one entry per prompt, e\.g\. \[image\] \* 2"
    ):
        vlm(str(tmp_path / "img.png"), ["a?", "b?"])
    with pytest.raises(ValueError, match="max_new_tokens=1000000000 is more than the model's .* positions"):
        vlm(picture, "a?", max_new_tokens=10**9)
    limit = vlm.target.config.text_config.max_position_embeddings
    with pytest.raises(ValueError, match="the prompt has .* tokens, so max_new_tokens=.* would run past"):
        vlm(picture, "a?", max_new_tokens=limit)
    with pytest.raises(ValueError, match="prompt must be a string or a list of strings"):
        vlm(picture, 3)


def test_vlm_takes_numpy_arrays_and_tensors_as_images():
    vlm = tiny_pipeline("llava")
    picture = image(1)
    pixels = np.asarray(picture)  # [H, W, 3] uint8
    want = vlm(picture, "what?", max_new_tokens=5, num_draft_tokens=0).token_ids
    for array in (
        pixels,
        pixels.transpose(2, 0, 1),
        torch.from_numpy(pixels).permute(2, 0, 1),
        torch.from_numpy(pixels).float() / 255,
    ):
        assert torch.equal(vlm(array, "what?", max_new_tokens=5, num_draft_tokens=0).token_ids, want)
    assert torch.equal(
        vlm([pixels, pixels], ["what?", "what?"], max_new_tokens=5, num_draft_tokens=0).token_ids[0], want[0]
    )
    with pytest.raises(ValueError, match="a float image array must hold values in \\[0, 1\\]"):
        vlm(pixels.astype(np.float32), "what?", max_new_tokens=2)
    with pytest.raises(ValueError, match="an image array must be"):
        vlm(np.zeros((2, 3, 4, 5), np.uint8), "what?", max_new_tokens=2)


# ------------------------------------------------------------------ strict loading
def test_from_pretrained_refuses_another_models_weights(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "good")
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "good", bad)
    shutil.copy(
        bad / "vq" / "diffusion_pytorch_model.safetensors", bad / "target" / "diffusion_pytorch_model.safetensors"
    )
    with pytest.raises(
        ValueError,
        match=r"the weights of LlamaGenGPT in .*target do not match its config \(missing keys: "
        r"cls_embedding.* in all\); unexpected keys: decoder\.",
    ):
        LlamaGenPipeline.from_pretrained(bad)
    # A mis-shaped tensor is named with both shapes.
    shutil.copy(tmp_path / "good" / "target" / "diffusion_pytorch_model.safetensors", bad / "target")
    weights = load_file(bad / "vq" / "diffusion_pytorch_model.safetensors")
    name = next(k for k in weights if "codebook" in k or "embedding" in k)
    weights[name] = weights[name][:-1].contiguous()
    save_file(weights, bad / "vq" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=rf"LlamaGenVQ .*shape mismatches: {name} \(checkpoint"):
        LlamaGenPipeline.from_pretrained(bad)
    LlamaGenPipeline.from_pretrained(tmp_path / "good")  # a matching folder loads


def test_load_eagle_head_on_a_wrong_folder_is_a_clear_error(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    with pytest.raises(ValueError, match="holds no EAGLE head: it needs config.json and model.safetensors"):
        pipe.load_eagle_head(str(tmp_path / "pipe" / "target"))
    target = pipe.target
    config = EagleConfig(
        hidden_size=target.config.dim,
        n_head=4,
        vocab_size=target.config.vocab_size,
        target_name=target_fingerprint(target.output),
    )
    head = EagleHead(config, target.tok_embeddings, target.output)
    head.save_pretrained(tmp_path / "head")
    pipe.load_eagle_head(str(tmp_path / "head"))  # the right folder loads
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "head", other)
    (other / "config.json").write_text(json.dumps({"dim": 8, "n_layer": 2}))
    with pytest.raises(
        ValueError, match=r"is not an EAGLE head config \(missing keys: \['hidden_size'.*unexpected keys: \['dim'"
    ):
        pipe.load_eagle_head(str(other))
    weights = load_file(tmp_path / "head" / "model.safetensors")
    dropped = min(weights)
    del weights[dropped]
    save_file(weights, other / "model.safetensors")
    shutil.copy(tmp_path / "head" / "config.json", other / "config.json")
    with pytest.raises(ValueError, match=rf"the weights of the EAGLE head in .*\(missing keys: {dropped}\)"):
        pipe.load_eagle_head(str(other))


def test_vlm_from_pretrained_refuses_missing_weights(tmp_path):
    from mmspec.pipelines.vlm import VLMPipeline

    model, processor = tiny_vlm("llava")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = min(k for k in weights if "layers.0" in k)
    del weights[dropped]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError,
        match=r"the weights of LlavaForConditionalGeneration in .* do not match its config "
        r"\(missing keys: .*layers\.0",
    ):
        VLMPipeline.from_pretrained(tmp_path)
