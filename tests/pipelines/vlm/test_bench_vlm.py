"""The ``vlm`` bench suite: a VLM folder (with its draft VLM in ``drafter/``) against transformers
``generate`` and assisted generation with the same draft model, on the same images, same captions."""

from __future__ import annotations

import json

import pytest
import torch

from mmspec.app.bench import load_suites, run_benchmark
from mmspec.training.saved import DRAFT_VOCAB_FILE

from .test_vlm import image, tiny_vlm


def test_vlm_suite_runs_methods_and_peers_with_equal_captions(tmp_path):
    model, processor = tiny_vlm("llava")
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    draft, _ = tiny_vlm("llava", seed=1)
    draft.save_pretrained(tmp_path / "vlm" / "drafter")
    ids = list(range(0, model.config.text_config.vocab_size, 2))  # the saved draft vocabulary: even ids
    (tmp_path / "vlm" / "drafter" / DRAFT_VOCAB_FILE).write_text(json.dumps(ids))
    (tmp_path / "images").mkdir()
    for i in range(2):
        image(i).save(tmp_path / "images" / f"{i}.png")
    suite = load_suites()["vlm"](
        torch.device("cpu"),
        torch.float32,
        1,
        model=str(tmp_path / "vlm"),
        images=str(tmp_path / "images"),
        max_new_tokens=8,
        num_draft_tokens=3,
        configs="model;model:k=2;ngram",
    )
    assert suite.setup["draft_vocab_size"] == len(ids)
    names = [c.name for c in suite.cases]
    assert names == [
        "baseline (static cache, eager)",
        "model",
        "model:k=2",
        "ngram",
        "transformers generate",
        "transformers assisted (draft model) k=2",  # one assisted peer per k, in order of k
        "transformers assisted (draft model)",
    ]
    assert suite.parts == 2  # one image a part: rounds interleave the configurations image by image
    record = run_benchmark(suite, torch.device("cpu"), repeats=1, warmup=0)
    by_name = {r["name"]: r for r in record["results"]}
    assert all(r["tokens_equal_baseline"] for r in record["results"]), [
        r["name"] for r in record["results"] if not r["tokens_equal_baseline"]
    ]
    assert by_name["model"]["compare_to"] == "transformers assisted (draft model)"
    assert by_name["model:k=2"]["compare_to"] == "transformers assisted (draft model) k=2"
    assert by_name["model:k=2"]["config"]["num_draft_tokens"] == 2
    assert by_name["transformers assisted (draft model) k=2"]["config"]["num_assistant_tokens"] == 2
    assert by_name["model"]["steps"] and by_name["transformers generate"]["steps"] is None
    assert by_name["model"]["profiled_verify_s"] > 0  # the VLM pipeline times its phases when profiling
    folders = {"model": str(tmp_path / "vlm"), "images": str(tmp_path / "images")}
    whole = load_suites()["vlm"](torch.device("cpu"), torch.float32, 1, **folders, draft_vocab="all", peers=False)
    assert whole.setup["draft_vocab_size"] is None
    with pytest.raises(ValueError, match="draft_vocab must be 'saved' or 'all'"):
        load_suites()["vlm"](torch.device("cpu"), torch.float32, 1, **folders, draft_vocab="some")
    with pytest.raises(ValueError, match="needs --option model=VLM_FOLDER"):
        load_suites()["vlm"](torch.device("cpu"), torch.float32, 1, model=str(tmp_path / "vlm"))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
        ({"num_draft_tokens": 0}, "num_draft_tokens must be >= 1, got 0"),
        ({"num_images": 0}, "num_images must be >= 1, got 0"),
        ({"configs": "model:nope=1"}, r"unknown option\(s\) \['nope'\] for speculative method 'model'"),
        ({"configs": "bogus"}, "unknown speculative method 'bogus'"),
    ],
)
def test_vlm_settings_wrong_for_every_model_fail_before_it_loads(tmp_path, settings, message):
    """Nothing is read from the (empty) folders: the settings are refused first."""
    folders = {"model": str(tmp_path / "vlm"), "images": str(tmp_path / "images")}
    with pytest.raises(ValueError, match=message):
        load_suites()["vlm"](torch.device("cpu"), torch.float32, 1, **folders, **settings)
