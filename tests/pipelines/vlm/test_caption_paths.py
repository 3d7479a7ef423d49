"""``mmspec caption photo.png`` (issue 16, item 4): one or more image paths, folders or list files;
``path<TAB>caption`` lines on stdout without ``--output-dir``."""

from __future__ import annotations

import pytest

from mmspec.app.cli import main
from mmspec.pipelines.vlm import VLMPipeline, load_vlm_target

from .test_vlm import image, tiny_vlm


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, processor = tiny_vlm("llava")
    path = tmp_path_factory.mktemp("llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_single_and_mixed_paths_print_tab_separated_captions(model_dir, tmp_path, capsys):
    image(0).save(tmp_path / "photo.png")
    image(1).save(tmp_path / "odd-name.data", format="PNG")  # an image whose name says nothing: not a list
    (tmp_path / "folder").mkdir()
    image(2).save(tmp_path / "folder" / "x.png")
    (tmp_path / "list.txt").write_text("photo.png\n")
    common = ["--model", str(model_dir), "--drafter", "none", "--max-new-tokens", "5", "--device", "cpu"]
    assert main(["caption", str(tmp_path / "photo.png"), *common]) == 0
    lines = capsys.readouterr().out.splitlines()
    model, processor = tiny_vlm("llava")
    expected = VLMPipeline(load_vlm_target(model), processor)(image(0), "What is in the image?", max_new_tokens=5).text[
        0
    ]
    assert lines == [f"{tmp_path / 'photo.png'}\t{expected}"]
    assert (
        main(
            [
                "caption",
                str(tmp_path / "photo.png"),
                str(tmp_path / "odd-name.data"),
                str(tmp_path / "folder"),
                str(tmp_path / "list.txt"),
                *common,
            ]
        )
        == 0
    )
    paths = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert paths == [
        str(tmp_path / "photo.png"),
        str(tmp_path / "odd-name.data"),
        str(tmp_path / "folder" / "x.png"),
        str(tmp_path / "photo.png"),
    ]
    assert not (tmp_path / "outputs").exists()


def test_unreadable_paths_go_to_stderr(model_dir, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    image(3).save(tmp_path / "ok.png")
    assert (
        main(
            [
                "caption",
                str(tmp_path / "broken.png"),
                str(tmp_path / "ok.png"),
                "--model",
                str(model_dir),
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
    captured = capsys.readouterr()
    assert [line.split("\t")[0] for line in captured.out.splitlines()] == [str(tmp_path / "ok.png")]
    assert "broken.png" in captured.err and "cannot read image" in captured.err
    with pytest.raises(SystemExit, match="no such folder or list file"):
        main(["caption", str(tmp_path / "missing.png"), "--model", str(model_dir), "--device", "cpu"])


def test_the_caption_job_hands_transparent_images_to_the_processor_unconverted(model_dir, tmp_path, capsys):
    """The batch job decodes images without dropping alpha: its caption of an RGBA image equals the
    pipeline's on the same RGBA image (the processor composites onto white, issue 16 bug 1)."""
    import numpy as np
    import PIL.Image

    rgba = np.asarray(image(3).convert("RGBA")).copy()
    rgba[:, : rgba.shape[1] // 2, 3] = 0  # left half fully transparent: its hidden colour must not matter
    rgba[:, : rgba.shape[1] // 2, :3] = (255, 0, 0)
    picture = PIL.Image.fromarray(rgba, "RGBA")
    picture.save(tmp_path / "alpha.png")
    common = ["--model", str(model_dir), "--drafter", "none", "--max-new-tokens", "5", "--device", "cpu"]
    assert main(["caption", str(tmp_path / "alpha.png"), *common]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    model, processor = tiny_vlm("llava")
    pipe = VLMPipeline(load_vlm_target(model), processor)
    with PIL.Image.open(tmp_path / "alpha.png") as loaded:
        loaded.load()
        expected = pipe(loaded.copy(), "What is in the image?", max_new_tokens=5)
    assert line == f"{tmp_path / 'alpha.png'}\t{expected.text[0]}"
    # The check has teeth: dropping alpha (the hidden red shows) gives the processor other pixels.
    composited = processor.image_processor(picture, return_tensors="pt").pixel_values
    alpha_dropped = processor.image_processor(picture.convert("RGB"), return_tensors="pt").pixel_values
    assert not np.allclose(composited.numpy(), alpha_dropped.numpy())


def test_caption_with_an_eagle3_head_from_its_path_equals_the_baseline(model_dir, tmp_path, capsys):
    from mmspec.drafters.eagle3 import Eagle3Drafter

    from .test_eagle3_vlm import _random_head

    pipe = VLMPipeline.from_pretrained(model_dir)
    Eagle3Drafter(_random_head(pipe.target)).save_pretrained(tmp_path / "head")
    image(0).save(tmp_path / "photo.png")
    common = [str(tmp_path / "photo.png"), "--model", str(model_dir), "--max-new-tokens", "6", "--device", "cpu"]
    assert main(["caption", *common, "--drafter", "none"]) == 0
    baseline = capsys.readouterr().out
    assert main(["caption", *common, "--drafter", "eagle3", "--drafter-option", f"path={tmp_path / 'head'}"]) == 0
    assert capsys.readouterr().out == baseline
    with pytest.raises(SystemExit, match="unknown option.*'bogus'.*its options: layer_convention, path"):
        main(["caption", *common, "--drafter", "eagle3", "--drafter-option", "bogus=1"])
    with pytest.raises(SystemExit, match="--drafter-option needs a --drafter method"):
        main(["caption", *common, "--drafter", "none", "--drafter-option", "path=x"])
    with pytest.raises(SystemExit, match=r"--drafter eagle3 needs --drafter-option path=\.\.\."):
        main(["caption", *common, "--drafter", "eagle3"])
