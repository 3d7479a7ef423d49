"""Newcomer polish (issue 18, item 10): labelled eval grid rows, progress bars that end at their
total, timings that say when they were not measured, quiet dtype casts."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest
import torch

from mmspec.app.visualize import image_grid
from mmspec.pipelines.llamagen import LlamaGenPipeline

from ...conftest import tiny_llamagen


@pytest.fixture(scope="module")
def pipe():
    gpt, vq = tiny_llamagen()
    return LlamaGenPipeline(target=gpt, vq=vq)


def test_image_grid_labels_its_rows():
    tiles = [PIL.Image.new("RGB", (8, 8), (200, 0, 0))] * 4
    plain = image_grid(tiles, cols=2)
    labelled = np.asarray(image_grid(tiles, cols=2, row_labels=["baseline", "sjd:lantern"]))
    left = labelled.shape[1] - plain.size[0]
    assert left > 30 and labelled.shape[0] == plain.size[1]
    assert (labelled[:, :left] < 100).all(-1).any()  # dark text in the label column
    with pytest.raises(ValueError, match="1 row labels for 2 rows"):
        image_grid(tiles, cols=2, row_labels=["baseline"])


def test_progress_bar_ends_at_its_total(pipe):
    for speculative in (None, "sjd"):
        buffer = io.StringIO()
        pipe.set_progress_bar_config(file=buffer, ascii=True, mininterval=0)
        pipe(class_labels=[0, 1], speculative=speculative)
        final = buffer.getvalue().rstrip().rsplit("\r", 1)[-1]  # the bar as it was left
        assert final.startswith("100%") and " 9/9 " in final, final
    pipe.set_progress_bar_config(disable=True)


def test_unmeasured_timings_are_none_with_a_note(pipe):
    stats = pipe(class_labels=[0], speculative="sjd").stats
    summary = stats.summary()
    assert summary["draft_time_s"] is None and summary["verify_time_s"] is None and summary["other_time_s"] is None
    assert "profile=True" in summary["timing_note"] and summary["total_time_s"] > 0
    stats.draft_time, stats.verify_time = 0.01, 0.02  # what the loop records with profile=True
    profiled = stats.summary()
    assert profiled["verify_time_s"] == 0.02 and "timing_note" not in profiled


def test_dtype_casts_do_not_warn(pipe, capfd):
    gpt, vq = tiny_llamagen()
    fresh = LlamaGenPipeline(target=gpt, vq=vq)
    fresh.to(torch.bfloat16)
    fresh.target.to(torch.float32)
    fresh.vq.to(dtype=torch.float32)
    assert "should be kept in float32" not in capfd.readouterr().err
