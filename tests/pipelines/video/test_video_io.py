"""mmspec.app.video_io: video files (GIF always, mp4 where a writer is installed), the frame strip
and the τ-sweep plot (issue 15)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import PIL.Image
import pytest
import torch

from mmspec.app import video_io
from mmspec.app.video_io import frame_strip, save_video, tau_sweep_plot, video_to_uint8
from mmspec.app.visualize import SOURCE_COLOURS
from mmspec.stats import SOURCE_ACCEPTED, SOURCE_PREFILL, SOURCE_RECOVERED

#: Eight saturated colours: GIF's 256-colour palette keeps them exactly.
COLOURS = torch.tensor(
    [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]], dtype=torch.float32
)


def blocky_video(num_frames: int = 6, height: int = 6, width: int = 10, seed: int = 0) -> torch.Tensor:
    """``[F, 3, H, W]`` frames of 2x2-pixel cells in the eight colours above."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, 8, (num_frames, height // 2, width // 2), generator=g)
    video = COLOURS[cells].permute(0, 3, 1, 2)  # [F, 3, H/2, W/2]
    return video.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def gif_frames(path) -> list[np.ndarray]:
    with PIL.Image.open(path) as gif:
        frames = []
        for i in range(gif.n_frames):
            gif.seek(i)
            frames.append(np.asarray(gif.convert("RGB")))
        return frames


def test_video_layouts_all_become_uint8_frames_last():
    video = blocky_video()
    expected = (video * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [F, H, W, 3]
    assert np.array_equal(video_to_uint8(video), expected)
    assert np.array_equal(video_to_uint8(video.permute(0, 2, 3, 1).numpy()), expected)
    assert np.array_equal(video_to_uint8(expected), expected)
    assert np.array_equal(video_to_uint8([PIL.Image.fromarray(f) for f in expected]), expected)
    assert video_to_uint8(torch.full((1, 3, 2, 2), 1.7)).max() == 255  # decoders overshoot: clamped
    with pytest.raises(ValueError, match=r"\[F, 3, H, W\] or \[F, H, W, 3\].*\(1, 3, 4, 4, 4\)"):
        video_to_uint8(torch.rand(1, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="floats in \\[0, 1\\] or uint8"):
        video_to_uint8(np.zeros((2, 4, 4, 3), dtype=np.int64))


def test_gif_holds_every_frame_at_the_given_rate_and_scale(tmp_path):
    video = blocky_video()
    saved = save_video(video, tmp_path / "out" / "clip.gif", fps=5, scale=3)
    assert saved.path == tmp_path / "out" / "clip.gif" and saved.format == "gif" and saved.writer == "PIL"
    assert "animated GIF" in saved.note and "6 frames" in saved.note
    frames = gif_frames(saved.path)
    assert len(frames) == 6
    expected = video_to_uint8(video).repeat(3, axis=1).repeat(3, axis=2)
    assert np.array_equal(np.stack(frames), expected)
    with PIL.Image.open(saved.path) as gif:
        assert gif.info["duration"] == 200 and gif.info["loop"] == 0


def test_mp4_without_a_writer_falls_back_to_gif_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(video_io, "mp4_writer", lambda: None)
    with pytest.warns(UserWarning, match=r"no mp4 writer installed.*mmspec\[video\].*clip\.gif"):
        saved = save_video(blocky_video(), tmp_path / "clip.mp4", fps=8)
    assert saved.format == "gif" and saved.path == tmp_path / "clip.gif" and saved.path.is_file()
    assert not (tmp_path / "clip.mp4").exists()
    assert "instead of" in saved.note and len(gif_frames(saved.path)) == 6


@pytest.mark.skipif(video_io.mp4_writer() is None, reason="no mp4 writer (the `video` extra) installed")
def test_mp4_round_trips_frames_and_pads_odd_sizes(tmp_path):
    imageio = pytest.importorskip("imageio.v2")
    smooth = torch.linspace(0, 1, 21)[None, None, None, :].expand(6, 3, 15, 21).clone()  # [F, 3, 15, 21]
    smooth[:, 1] = torch.linspace(0, 1, 15)[None, :, None]
    smooth[3:, 2] = 0.5
    saved = save_video(smooth, tmp_path / "clip.mp4", fps=4)
    assert saved.format == "mp4" and saved.path == tmp_path / "clip.mp4" and saved.writer == video_io.mp4_writer()
    frames = np.stack(imageio.mimread(saved.path))  # [F, 16, 22, 3]: one row and column of padding
    assert frames.shape == (6, 16, 22, 3)
    error = np.abs(frames[:, :15, :21].astype(np.float64) - video_to_uint8(smooth)).mean()
    assert error < 6, error  # H.264 is lossy; a wrong layout or channel order is off by ~60
    assert imageio.get_reader(saved.path).get_meta_data()["fps"] == pytest.approx(4)


def test_save_video_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match=".mp4 or .gif"):
        save_video(blocky_video(), tmp_path / "clip.avi")
    with pytest.raises(ValueError, match="fps must be a positive number"):
        save_video(blocky_video(), tmp_path / "clip.gif", fps=0)
    with pytest.raises(ValueError, match="scale must be an integer >= 1"):
        save_video(blocky_video(), tmp_path / "clip.gif", scale=0)


def test_frame_strip_puts_each_block_in_a_row_framed_in_its_source_colour():
    video = blocky_video(num_frames=6, height=6, width=10)
    sources = [SOURCE_PREFILL, SOURCE_ACCEPTED, SOURCE_RECOVERED]
    strip = frame_strip(video, 2, scores=[math.nan, 0.5, -0.2], sources=sources, tau=0.0, scale=2)
    pixels = np.asarray(strip)
    frames = video_to_uint8(video).repeat(2, axis=1).repeat(2, axis=2)  # [6, 12, 20, 3]
    border, gap, h, w = 3, 2, 12, 20
    for block, source in enumerate(sources):
        top = gap + block * (h + 2 * border + gap)
        assert tuple(pixels[top, 0]) == SOURCE_COLOURS[source]  # the frame around the row
        for j in range(2):
            left = border + j * (w + gap)
            cell = pixels[top + border : top + border + h, left : left + w]
            assert np.array_equal(cell, frames[block * 2 + j])
    # the label column holds text (dark pixels) right of each row
    assert (pixels[:, 2 * (w + gap) - gap + 2 * border + gap :] < 128).any()
    # accepted alone: kept = green, rejected = red
    strip = np.asarray(frame_strip(video, 3, accepted=torch.tensor([False, True])))
    assert tuple(strip[gap, 0]) == SOURCE_COLOURS[SOURCE_RECOVERED]
    second_row = gap + (6 + 2 * border + gap)  # unscaled frames are 6 pixels high
    assert tuple(strip[second_row, 0]) == SOURCE_COLOURS[SOURCE_ACCEPTED]


def test_frame_strip_rejects_mismatched_blocks():
    video = blocky_video(num_frames=6)
    with pytest.raises(ValueError, match="6 frames are not a whole number of blocks of 4"):
        frame_strip(video, 4)
    with pytest.raises(ValueError, match="scores has 2 entries for 3 blocks"):
        frame_strip(video, 2, scores=[0.0, 1.0])
    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        frame_strip(video, 0)


@dataclass
class SweepRow:
    tau: float
    speedup: float
    quality_mean: float
    quality_worst: float


def test_tau_sweep_plot_writes_an_image(tmp_path):
    pytest.importorskip("matplotlib")  # the `plot` extra
    rows = [
        {"tau": math.inf, "speedup": 1.0, "quality_mean": -0.1, "quality_worst": -0.3},
        SweepRow(-0.5, 1.6, -0.15, -0.4),
        {"tau": -math.inf, "speedup": 2.3, "quality_mean": -0.5, "quality_worst": -1.4, "extra": "kept"},
    ]
    path = tau_sweep_plot(rows, tmp_path / "plots" / "sweep.png", quality_label="vlm score")
    with PIL.Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 300
    with pytest.raises(ValueError, match="record 1 lacks quality_worst"):
        tau_sweep_plot([rows[0], {"tau": 0.0, "speedup": 1.2, "quality_mean": 0.0}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="at least one record"):
        tau_sweep_plot([], tmp_path / "x.png")
