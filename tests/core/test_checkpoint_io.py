"""A model file that is there but cannot be read (truncated, corrupt, not JSON) is a ``ValueError``
naming the file (:mod:`mmspec.checkpoint_io`); unknown acceptance-rule options are named against the
rule's real options, without building the rule."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mmspec.checkpoint_io import check_safetensors_files, read_json, read_safetensors, read_torch, safetensors_shapes
from mmspec.rules import ACCEPTANCE_RULES, check_rule_options, get_acceptance_rule


def truncated(path, size: int = 100):
    path.write_bytes(path.read_bytes()[:size])
    return path


def test_a_truncated_safetensors_file_is_named(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.zeros(64, 64)}, good)
    assert safetensors_shapes(good) == {"w": (64, 64)} and read_safetensors(good)["w"].shape == (64, 64)
    check_safetensors_files(tmp_path)  # nothing to say about a good file
    # cut in the header and cut in the data: both found from the header alone
    for size in (100, good.stat().st_size - 10):
        bad = tmp_path / f"bad{size}.safetensors"
        bad.write_bytes(good.read_bytes()[:size])
        message = rf"cannot read {bad}: not a valid safetensors file \(truncated or corrupt\?"
        with pytest.raises(ValueError, match=message):
            safetensors_shapes(bad)
        with pytest.raises(ValueError, match=message):
            read_safetensors(bad)
        with pytest.raises(ValueError, match=message):
            check_safetensors_files(tmp_path)
        bad.unlink()
    with pytest.raises(FileNotFoundError):  # a missing file stays what it was
        read_safetensors(tmp_path / "missing.safetensors")


def test_malformed_json_is_named_with_line_and_column(tmp_path):
    file = tmp_path / "config.json"
    file.write_text('{"a": 1}')
    assert read_json(file) == {"a": 1}
    file.write_text('{\n  "a": 1,\n}')
    with pytest.raises(ValueError, match=rf"cannot read {file}: not valid JSON \(.* at line 3 column 1\)"):
        read_json(file)
    file.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match=rf"cannot read {file}: not valid JSON \(not UTF-8 text"):
        read_json(file)


@pytest.mark.parametrize("size", [0, 40])
def test_a_truncated_torch_checkpoint_is_named(tmp_path, size):
    file = tmp_path / "step-0000001.pt"
    torch.save({"step": 1, "w": torch.zeros(8)}, file)
    assert read_torch(file)["step"] == 1
    truncated(file, size)
    with pytest.raises(ValueError, match=rf"cannot read {file}: not a readable PyTorch checkpoint \(truncated"):
        read_torch(file)


def test_rule_options_are_checked_by_name_before_building():
    with pytest.raises(ValueError, match="acceptance rule 'exact' takes no options; got foo"):
        check_rule_options("exact", {"foo": 1})
    with pytest.raises(ValueError, match="acceptance rule 'exact' takes no options; got foo"):
        get_acceptance_rule("exact", foo=1)
    # as a pipeline builds it, the codebook-derived table is not an option, the cache folder is
    lantern = ACCEPTANCE_RULES["lantern"]
    assert "neighbours" not in lantern.option_names(from_resources=True)
    assert {"delta", "k", "neighbour_cache", "neighbour_rows"} <= set(lantern.option_names(from_resources=True))
    assert "neighbours" in lantern.option_names() and "neighbour_cache" not in lantern.option_names()
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['tau'\] for acceptance rule 'gsd'; its options: "):
        check_rule_options("gsd", {"tau": 1})
    check_rule_options("gsd", {"group_size": 5, "embedding": "tokens"})
    with pytest.raises(ValueError, match="unknown acceptance rule 'nope'"):
        check_rule_options("nope", {})
    # a value of the wrong type still names the rule
    with pytest.raises(ValueError, match="acceptance rule 'score-threshold'"):
        get_acceptance_rule("score-threshold")
