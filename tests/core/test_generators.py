"""``--model`` resolution of ``mmspec generate`` / ``mmspec eval`` (the family registry,
:mod:`mmspec.app.generators`): families, embedded names, folders, and clear errors — never a hub look-up."""

from __future__ import annotations

import json

import pytest

from mmspec.app.cli import main
from mmspec.app.generators import assets_dir, load_families, resolve_model


def test_every_family_is_registered_once_with_its_hooks():
    families = load_families()
    assert "llamagen" in families
    for name, family in families.items():
        assert family.name == name
        assert family.inputs in ("class_labels", "prompts")
        assert callable(family.load) and callable(family.prepare)
        registry = family.methods()
        if family.default_method is not None:
            assert family.default_method in registry.names()
        if family.embedded is not None:
            assert (assets_dir() / family.embedded).is_dir(), f"{name}: embedded model {family.embedded} is missing"


def test_model_names_resolve_to_families_and_folders(tmp_path):
    llamagen = load_families()["llamagen"]
    assert resolve_model(None).family is llamagen
    assert resolve_model("llamagen").path == assets_dir() / "llamagen-emoji"
    assert resolve_model("llamagen-emoji").family is llamagen
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "LlamaGenPipeline"}))
    assert resolve_model(str(tmp_path)).family is llamagen


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not a model folder"),
        ({"model_index.json": {"_class_name": "StableDiffusionPipeline"}}, "no generation family for pipeline class"),
        ({"config.json": {"model_type": "bert"}}, "does not support model_type 'bert'"),
    ],
)
def test_folders_of_other_models_are_clear_errors(tmp_path, content, message):
    for name, value in (content or {}).items():
        (tmp_path / name).write_text(json.dumps(value))
    with pytest.raises(SystemExit, match=message):
        resolve_model(str(tmp_path))


def test_an_unknown_name_is_an_error_listing_the_known_ones_not_a_hub_lookup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        SystemExit, match=r"--model no-such-model: no such folder, and not a model name \(known: .*llamagen"
    ):
        main(["generate", "--model", "no-such-model", "--output-dir", str(tmp_path / "out")])


def test_inputs_must_match_the_family(tmp_path):
    with pytest.raises(SystemExit, match="llamagen models take class labels"):
        main(["generate", "--prompt", "a cat", "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("model", "option", "owner"),
    [
        ("llamagen", ["--num-frames", "4"], "video"),
        ("llamagen", ["--num-iter", "4"], "mar"),
        ("mar", ["--scorer", "clip"], "video"),
        ("video", ["--emu3-grid", "4x4"], "emu3"),
        ("video", ["--eagle-head", "x"], "llamagen"),
    ],
)
def test_options_of_other_families_are_refused_not_ignored(tmp_path, model, option, owner):
    with pytest.raises(SystemExit, match=f"{option[0]} is an option of {owner} models; this is a {model} model"):
        main(["generate", "--model", model, *option, "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
