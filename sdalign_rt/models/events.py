"""Event-camera streams → the RGB images EventGPT's vision tower reads.

An event file is a pickled dict in .npy with arrays x, y, p, t (t in microseconds). The stream is cut into
`parts` (5) chunks of equal event count (np.array_split: the first n % parts chunks get one event more),
and each chunk is drawn on a white canvas: positive polarity red (255, 0, 0), negative blue (0, 0, 255).
Where several events of a chunk hit one pixel, the last one in stream order sets its colour (what drawing
event by event does). The canvas is (max y + 1, max x + 1) of the chunk, as EventGPT draws it, unless a
sensor size is given (DSEC: 480 x 640) to draw every chunk on the same canvas. Vectorised: no per-event loop.
"""
from __future__ import annotations

import os
import pickle

import numpy as np

REQUIRED_KEYS = ("x", "y", "p", "t")
WHITE = np.array([255, 255, 255], dtype=np.uint8)
POSITIVE = np.array([255, 0, 0], dtype=np.uint8)
NEGATIVE = np.array([0, 0, 255], dtype=np.uint8)


def load_events(path: str) -> dict:
    """Read and validate an event .npy file (a pickled dict with x, y, p, t)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"event file {path!r} does not exist")
    try:
        raw = np.load(path, allow_pickle=True)
    except (ValueError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise ValueError(f"event file {path!r} is not a readable .npy file: {exc}") from None
    events = raw.item() if isinstance(raw, np.ndarray) and raw.dtype == object and raw.shape == () else raw
    return validate_events(events, source=path)


def validate_events(events, sensor_size: tuple[int, int] | None = None, source: str = "events") -> dict:
    """Check keys, lengths, emptiness, coordinates and time order; return int/bool numpy arrays."""
    if not isinstance(events, dict):
        raise ValueError(f"{source}: expected a dict with keys {REQUIRED_KEYS}, got {type(events).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in events]
    if missing:
        raise ValueError(f"{source}: missing keys {missing} (an event file holds {REQUIRED_KEYS})")
    arrays = {k: np.asarray(events[k]).reshape(-1) for k in REQUIRED_KEYS}
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{source}: x, y, p, t must have one length, got {lengths}")
    if lengths["x"] == 0:
        raise ValueError(f"{source}: the event stream is empty")
    for k in ("x", "y"):
        if not np.issubdtype(arrays[k].dtype, np.number) or not np.all(np.isfinite(arrays[k])):
            raise ValueError(f"{source}: {k} must hold finite numbers")
        if np.any(arrays[k] != np.round(arrays[k])):
            raise ValueError(f"{source}: {k} must hold integer pixel coordinates")
        if arrays[k].min() < 0:
            raise ValueError(f"{source}: {k} has negative coordinates (min {arrays[k].min()})")
    x, y = arrays["x"].astype(np.int64), arrays["y"].astype(np.int64)
    if sensor_size is not None:
        height, width = sensor_size
        if x.max() >= width or y.max() >= height:
            raise ValueError(f"{source}: coordinates out of range for a {height}x{width} sensor "
                             f"(max x {x.max()}, max y {y.max()})")
    polarity = arrays["p"]
    if not np.all(np.isin(polarity, (-1, 0, 1))):
        raise ValueError(f"{source}: p must hold polarities 0/1 (or -1/1)")
    t = arrays["t"]
    if np.any(np.diff(t) < 0):
        first = int(np.nonzero(np.diff(t) < 0)[0][0])
        raise ValueError(f"{source}: t is not sorted (t[{first + 1}] = {t[first + 1]} < t[{first}] = {t[first]})")
    return {"x": x, "y": y, "p": polarity > 0, "t": t}


def split_equal_count(count: int, parts: int = 5) -> list[slice]:
    """Slices of `count` events into `parts` chunks of equal count (the first count % parts get one more)."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if count < parts:
        raise ValueError(f"cannot cut {count} events into {parts} parts of equal count")
    bounds = np.cumsum([0] + [count // parts + (1 if i < count % parts else 0) for i in range(parts)])
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def render_event_images(events: dict, parts: int = 5, sensor_size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """`parts` RGB uint8 images [H, W, 3], one per chunk of equal event count."""
    events = validate_events(events, sensor_size)
    images = []
    for chunk in split_equal_count(len(events["x"]), parts):
        x, y, positive = events["x"][chunk], events["y"][chunk], events["p"][chunk]
        height, width = sensor_size if sensor_size is not None else (int(y.max()) + 1, int(x.max()) + 1)
        image = np.empty((height, width, 3), dtype=np.uint8)
        image[:] = WHITE
        pixel = y * width + x
        # The last event at each pixel wins: the first occurrence in the reversed chunk.
        _, first_in_reverse = np.unique(pixel[::-1], return_index=True)
        last = len(pixel) - 1 - first_in_reverse
        flat = image.reshape(-1, 3)
        flat[pixel[last]] = np.where(positive[last, None], POSITIVE, NEGATIVE)
        images.append(image)
    return images


def render_event_images_torch(events: dict, parts: int = 5, sensor_size: tuple[int, int] | None = None,
                              device="cuda"):
    """render_event_images on a torch device (the GPU path): the same images, as uint8 tensors [H, W, 3].

    The last event at a pixel is found with a scatter-max of event indices instead of numpy's unique.
    """
    import torch

    events = validate_events(events, sensor_size)
    x = torch.as_tensor(events["x"], device=device)
    y = torch.as_tensor(events["y"], device=device)
    positive = torch.as_tensor(events["p"], device=device)
    colours = torch.tensor([[0, 0, 255], [255, 0, 0]], dtype=torch.uint8, device=device)  # negative, positive
    images = []
    for chunk in split_equal_count(len(events["x"]), parts):
        cx, cy, cp = x[chunk], y[chunk], positive[chunk]
        height, width = sensor_size if sensor_size is not None else (int(cy.max()) + 1, int(cx.max()) + 1)
        pixel = cy * width + cx
        last = torch.full((height * width,), -1, dtype=torch.long, device=device)
        last.scatter_reduce_(0, pixel, torch.arange(len(pixel), device=device), reduce="amax")
        hit = last >= 0
        image = torch.full((height * width, 3), 255, dtype=torch.uint8, device=device)
        image[hit] = colours[cp[last[hit]].long()]
        images.append(image.view(height, width, 3))
    return images
