"""``mmspec caption``: a folder/list of images -> JSONL; bad images skipped and reported; resumable."""

from __future__ import annotations

import json

import pytest

from mmspec.app.cli import main

from .test_vlm import image, tiny_vlm


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, processor = tiny_vlm("llava")
    path = tmp_path_factory.mktemp("llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_caption_folder_skips_bad_images_and_resumes(model_dir, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        image(i).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    common = [
        "--model",
        str(model_dir),
        "--output-dir",
        str(out),
        "--batch-size",
        "2",
        "--max-new-tokens",
        "6",
        "--device",
        "cpu",
    ]
    assert main(["caption", str(folder), "--drafter", "none", *common]) == 0
    captions = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [c["image"].rsplit("/", 1)[1] for c in captions] == ["0.png", "1.png", "2.png"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_errors"] == 1 and "cannot read image" in stats["errors"][0]["error"]
    # Resume with the same settings: nothing is redone. Other settings on that folder are refused
    # (they would make other captions); (greedy) a fresh run with the n-gram drafter writes exactly
    # the baseline captions.
    assert main(["caption", str(folder), "--drafter", "none", *common]) == 0
    assert "0 new, 3 already done" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="holds results made with other settings .*drafter"):
        main(["caption", str(folder), "--drafter", "ngram", *common])
    spec_out = tmp_path / "spec"
    assert (
        main(["caption", str(folder), "--drafter", "ngram", *common[:2], "--output-dir", str(spec_out), *common[4:]])
        == 0
    )
    spec = [json.loads(line) for line in (spec_out / "captions.jsonl").read_text().splitlines()]
    assert [c["caption"] for c in spec] == [c["caption"] for c in captions]


def test_caption_list_file_and_unknown_drafter(model_dir, tmp_path):
    image(7).save(tmp_path / "a.png")
    listing = tmp_path / "list.txt"
    listing.write_text("a.png\nmissing.png\n")
    out = tmp_path / "out"
    assert (
        main(
            [
                "caption",
                str(listing),
                "--model",
                str(model_dir),
                "--output-dir",
                str(out),
                "--drafter",
                "none",
                "--max-new-tokens",
                "4",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_results"] == 1 and stats["errors"][0]["input"].endswith("missing.png")
    with pytest.raises(SystemExit, match="--drafter must be one of"):
        main(["caption", str(listing), "--model", str(model_dir), "--drafter", "medusa", "--device", "cpu"])
