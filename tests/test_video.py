"""Video frames: uniform sampling to 8 frames from arrays and mp4 files, and bad input."""
import numpy as np
import pytest

from sdalign_rt.models import video


@pytest.mark.parametrize("total", [1, 3, 8, 30, 241])
def test_sampling(total):
    idx = video.sample_frame_indices(total)
    assert len(idx) == 8 and idx[0] == 0 and idx[-1] == total - 1 and np.all(np.diff(idx) >= 0)


def test_from_array():
    frames = np.arange(20)[:, None, None, None] * np.ones((20, 4, 6, 3), dtype=np.uint8)
    out = video.load_video_frames(frames)
    assert out.shape == (8, 4, 6, 3) and out.dtype == np.uint8
    assert out[:, 0, 0, 0].tolist() == video.sample_frame_indices(20).tolist()


def test_mp4_round_trip(tmp_path):
    pytest.importorskip("av")
    rng = np.random.default_rng(0)
    frames = np.repeat(rng.integers(0, 255, (12, 1, 1, 3)), 32, 1).repeat(32, 2).astype(np.uint8)
    path = str(tmp_path / "clip.mp4")
    video.write_video(path, frames)
    out = video.load_video_frames(path)
    assert out.shape == (8, 32, 32, 3)
    expected = frames[video.sample_frame_indices(12)].astype(int)
    assert np.abs(out.astype(int) - expected).mean() < 12  # lossy codec: colours survive roughly


@pytest.mark.parametrize("source,error,message", [
    (np.zeros((4, 5, 5)), ValueError, r"\[T, H, W, 3\]"),
    (np.zeros((0, 5, 5, 3), dtype=np.uint8), ValueError, "no frames"),
    (np.full((2, 5, 5, 3), 300.0), ValueError, "uint8, or numbers in"),
    ("/nonexistent/clip.mp4", FileNotFoundError, "does not exist"),
])
def test_bad_input(source, error, message):
    with pytest.raises(error, match=message):
        video.load_video_frames(source)


def test_not_a_video(tmp_path):
    pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    path.write_text("not a video")
    with pytest.raises(ValueError, match="not a readable video"):
        video.load_video_frames(str(path))
