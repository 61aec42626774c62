"""Event preprocessing: equal-count parts, colours, sizes, equivalence to drawing event by event, errors."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sdalign_rt.models import events as ev


def slow_render(events, parts=5, sensor_size=None):
    """The rule written plainly: one event at a time."""
    n = len(events["x"])
    base, extra = divmod(n, parts)
    images, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        xs, ys, ps = events["x"][start:stop], events["y"][start:stop], events["p"][start:stop]
        h, w = sensor_size or (max(ys) + 1, max(xs) + 1)
        image = np.full((h, w, 3), 255, dtype=np.uint8)
        for x, y, p in zip(xs, ys, ps):
            image[y, x] = (255, 0, 0) if p > 0 else (0, 0, 255)
        images.append(image)
        start = stop
    return images


@st.composite
def streams(draw, max_events=400):
    n = draw(st.integers(5, max_events))
    width, height = draw(st.integers(1, 40)), draw(st.integers(1, 30))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    polarity = draw(st.sampled_from(["01", "pm1"]))
    p = rng.integers(0, 2, n)
    return {"x": rng.integers(0, width, n), "y": rng.integers(0, height, n),
            "p": p if polarity == "01" else 2 * p - 1, "t": np.sort(rng.integers(0, 10**6, n))}


@settings(max_examples=40)
@given(stream=streams(), parts=st.integers(1, 7), fixed=st.booleans())
def test_matches_drawing_event_by_event(stream, parts, fixed):
    if len(stream["x"]) < parts:
        return
    sensor = (int(stream["y"].max()) + 1 + 2, int(stream["x"].max()) + 1 + 3) if fixed else None
    fast = ev.render_event_images(stream, parts, sensor)
    slow = slow_render(stream, parts, sensor)
    assert len(fast) == parts
    for a, b in zip(fast, slow):
        assert a.dtype == np.uint8 and a.shape == b.shape and np.array_equal(a, b)


@settings(max_examples=30)
@given(count=st.integers(5, 10**6), parts=st.integers(1, 5))
def test_equal_event_counts(count, parts):
    sizes = [s.stop - s.start for s in ev.split_equal_count(count, parts)]
    assert sum(sizes) == count and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_colours_and_size():
    stream = {"x": np.array([0, 3, 3, 1, 2]), "y": np.array([0, 1, 1, 2, 0]), "p": np.array([1, 0, 1, 0, 1]),
              "t": np.arange(5)}
    (image,) = ev.render_event_images(stream, parts=1)
    assert image.shape == (3, 4, 3)
    assert tuple(image[0, 0]) == (255, 0, 0) and tuple(image[2, 1]) == (0, 0, 255)
    assert tuple(image[1, 3]) == (255, 0, 0)  # two events on one pixel: the later (positive) wins
    assert tuple(image[2, 3]) == (255, 255, 255)


def test_load_round_trip(tmp_path):
    stream = {"x": np.arange(10) % 4, "y": np.arange(10) % 3, "p": np.arange(10) % 2, "t": np.arange(10) * 50}
    path = tmp_path / "clip.npy"
    np.save(path, stream, allow_pickle=True)
    loaded = ev.load_events(str(path))
    assert np.array_equal(loaded["x"], stream["x"]) and loaded["p"].dtype == bool


@pytest.mark.parametrize("change,message", [
    (lambda s: {k: v for k, v in s.items() if k != "t"}, r"missing keys \['t'\]"),
    (lambda s: {k: v[:0] for k, v in s.items()}, "the event stream is empty"),
    (lambda s: {**s, "x": s["x"] - 5}, "x has negative coordinates"),
    (lambda s: {**s, "t": s["t"][::-1]}, "t is not sorted"),
    (lambda s: {**s, "p": s["p"] + 3}, "p must hold polarities"),
    (lambda s: {**s, "y": s["y"][:-1]}, "must have one length"),
    (lambda s: {**s, "x": s["x"] + 0.5}, "integer pixel coordinates"),
])
def test_bad_streams(change, message):
    stream = {"x": np.arange(10) % 4 + 1, "y": np.arange(10) % 3, "p": np.arange(10) % 2, "t": np.arange(10)}
    with pytest.raises(ValueError, match=message):
        ev.render_event_images(change(stream), parts=5)


def test_out_of_range_for_the_sensor_and_missing_files(tmp_path):
    stream = {"x": np.array([0, 700]), "y": np.array([0, 10]), "p": np.array([0, 1]), "t": np.array([0, 1])}
    with pytest.raises(ValueError, match="out of range for a 480x640 sensor"):
        ev.render_event_images(stream, parts=1, sensor_size=(480, 640))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ev.load_events(str(tmp_path / "missing.npy"))
    (tmp_path / "bad.npy").write_text("not numpy")
    with pytest.raises(ValueError, match="not a readable .npy file"):
        ev.load_events(str(tmp_path / "bad.npy"))
    with pytest.raises(ValueError, match="cannot cut 3 events into 5 parts"):
        ev.render_event_images({"x": [0, 1, 2], "y": [0, 0, 0], "p": [0, 1, 0], "t": [0, 1, 2]}, parts=5)


@settings(max_examples=20)
@given(stream=streams(), parts=st.integers(1, 5))
def test_torch_path_matches(stream, parts):
    """The device (GPU) path gives the numpy path's images; run on CPU here, on CUDA when present."""
    import torch

    if len(stream["x"]) < parts:
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for a, b in zip(ev.render_event_images_torch(stream, parts, device=device), ev.render_event_images(stream, parts)):
        assert np.array_equal(a.cpu().numpy(), b)
