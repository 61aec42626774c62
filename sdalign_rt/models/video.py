"""Video frames for Video-LLaVA: from an array or a video file, sampled uniformly to 8 frames."""
from __future__ import annotations

import os

import numpy as np

NUM_FRAMES = 8


def sample_frame_indices(total: int, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """num_frames indices spread evenly over [0, total), first and last frames included (repeats if short)."""
    if total < 1:
        raise ValueError("the video has no frames")
    return np.linspace(0, total - 1, num_frames).round().astype(np.int64)


def load_video_frames(source, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """[num_frames, H, W, 3] uint8 RGB from an array [T, H, W, 3] or a video file (decoded with PyAV)."""
    if isinstance(source, (str, os.PathLike)):
        frames = _decode(os.fspath(source))
    else:
        frames = np.asarray(source)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be [T, H, W, 3] RGB, got shape {frames.shape}")
        if frames.dtype != np.uint8:
            if not np.issubdtype(frames.dtype, np.number) or frames.min() < 0 or frames.max() > 255:
                raise ValueError("frames must be uint8, or numbers in [0, 255]")
            frames = frames.round().astype(np.uint8)
    return frames[sample_frame_indices(len(frames), num_frames)]


def _decode(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file {path!r} does not exist")
    try:
        import av
    except ImportError:
        raise ImportError("reading video files needs PyAV: pip install av") from None
    try:
        with av.open(path) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except (av.error.FFmpegError, IndexError) as exc:
        raise ValueError(f"{path!r} is not a readable video: {exc}") from None
    if not frames:
        raise ValueError(f"{path!r} holds no video frames")
    return np.stack(frames)


def write_video(path: str, frames: np.ndarray, fps: int = 10) -> None:
    """Write RGB frames [T, H, W, 3] as an mp4 (synthetic samples, tests)."""
    import av

    frames = np.asarray(frames, dtype=np.uint8)
    with av.open(path, mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
