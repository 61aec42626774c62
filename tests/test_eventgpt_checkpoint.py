"""EventGPT checkpoints as published: the nested tower names of the public module tree, the flat ones, no tower
weights (tower from mm_visual_tower); how mm_visual_tower is found; weights nothing provides are errors; the
tokenizer's added tokens resize the embeddings."""
import json
import logging
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from safetensors.torch import load_file, save_file  # noqa: E402

from sdalign_rt.models.eventgpt_checkpoint import NESTED_TOWER, TOWER, load_eventgpt  # noqa: E402
from sdalign_rt.models.pair import TINY_TOWER, save_tiny_pair  # noqa: E402


def saved_weights(drafter_dir: str, clip_dir: str | None = None) -> dict:
    """What the files hold, under the model's names (CLIP's transformers-4 `vision_model.` level dropped)."""
    state = {}
    for name in sorted(os.listdir(drafter_dir)):
        path = os.path.join(drafter_dir, name)
        if name.endswith(".safetensors"):
            state.update(load_file(path))
        elif name.endswith(".bin"):
            state.update(torch.load(path, weights_only=True))
    out = {}
    for name, tensor in state.items():
        if name.startswith(TOWER):
            rest = name[len(NESTED_TOWER):] if name.startswith(NESTED_TOWER) else name[len(TOWER):]
            name = NESTED_TOWER + rest.removeprefix("vision_model.")
        out[name] = tensor
    if clip_dir is not None:
        clip = load_file(os.path.join(clip_dir, "model.safetensors"))
        prefix = "vision_model."
        out.update({NESTED_TOWER + n[len(prefix):]: t for n, t in clip.items() if n.startswith(prefix)})
    return out


def assert_loaded_as_saved(model, expected: dict):
    state = model.state_dict()
    assert set(state) == set(expected)
    for name, tensor in state.items():
        assert torch.equal(tensor, expected[name]), name


def rewrite(drafter_dir: str, change) -> None:
    path = os.path.join(drafter_dir, "model.safetensors")
    save_file(change(load_file(path)), path, metadata={"format": "pt"})


@pytest.mark.parametrize("layout, safe", [("nested", True), ("nested", False), ("flat", True), ("none", True)])
def test_layouts_load_as_saved(tmp_path, layout, safe):
    drafter_dir, _ = save_tiny_pair(str(tmp_path), safe_serialization=safe, layout=layout)
    config = json.loads(open(os.path.join(drafter_dir, "config.json")).read())
    loaded = load_eventgpt(drafter_dir, dtype=torch.float32)
    assert loaded.layout == layout
    clip_dir = str(tmp_path / TINY_TOWER)
    if layout == "flat":
        assert loaded.tower_dir is None and "vision_config" in config
    else:  # a public config: the tower's shape and processor come from the CLIP folder
        assert "vision_config" not in config and os.path.samefile(loaded.tower_dir, clip_dir)
        assert config["mm_visual_tower"] == (TINY_TOWER if layout == "nested" else os.path.abspath(clip_dir))
        assert not os.path.exists(os.path.join(drafter_dir, "preprocessor_config.json"))
    assert loaded.event_processor.crop_size["height"] == 28
    assert_loaded_as_saved(loaded.model, saved_weights(drafter_dir, clip_dir if layout == "none" else None))


def test_checkpoint_tower_wins_over_the_folder(tmp_path):
    """As in the public code: the tower built from mm_visual_tower is overwritten by the checkpoint's weights."""
    drafter_dir, _ = save_tiny_pair(str(tmp_path))
    clip_file = tmp_path / TINY_TOWER / "model.safetensors"
    save_file({n: t + 1 for n, t in load_file(str(clip_file)).items()}, str(clip_file), metadata={"format": "pt"})
    assert_loaded_as_saved(load_eventgpt(drafter_dir, dtype=torch.float32).model, saved_weights(drafter_dir))


def test_flat_names_with_clips_old_level(tmp_path):
    """model.visual_tower.vision_model.* (a flat checkpoint written by transformers 4) loads too."""
    drafter_dir, _ = save_tiny_pair(str(tmp_path), layout="flat")
    rewrite(drafter_dir, lambda s: {TOWER + "vision_model." + n[len(TOWER):] if n.startswith(TOWER) else n: t
                                    for n, t in s.items()})
    loaded = load_eventgpt(drafter_dir, dtype=torch.float32)
    assert loaded.layout == "flat"
    assert_loaded_as_saved(loaded.model, saved_weights(drafter_dir))


def test_finding_mm_visual_tower(tmp_path):
    """A bare name is looked up beside the checkpoint, then in clip_dir (a folder holding it, or the tower itself);
    when it is nowhere the error says what to download."""
    drafter_dir, _ = save_tiny_pair(str(tmp_path / "a"))
    elsewhere = tmp_path / "towers"
    shutil.move(str(tmp_path / "a" / TINY_TOWER), str(elsewhere / TINY_TOWER))
    with pytest.raises(FileNotFoundError, match=f"mm_visual_tower='{TINY_TOWER}'.*Download {TINY_TOWER}"):
        load_eventgpt(drafter_dir)
    assert os.path.samefile(load_eventgpt(drafter_dir, clip_dir=str(elsewhere), dtype=torch.float32).tower_dir,
                            elsewhere / TINY_TOWER)
    assert os.path.samefile(load_eventgpt(drafter_dir, clip_dir=str(elsewhere / TINY_TOWER),
                                          dtype=torch.float32).tower_dir, elsewhere / TINY_TOWER)
    config_path = os.path.join(drafter_dir, "config.json")
    config = json.loads(open(config_path).read())
    config["mm_visual_tower"] = "openai/clip-vit-large-patch14-336"
    open(config_path, "w").write(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="huggingface-cli download openai/clip-vit-large-patch14-336"):
        load_eventgpt(drafter_dir)
    with pytest.raises(ValueError, match="not an EventGPT checkpoint: its config.json has model_type 'clip'"):
        load_eventgpt(str(elsewhere / TINY_TOWER))


@pytest.mark.parametrize("drop, match", [
    ("model.visual_projector.0.weight", "lacks projector weights model.visual_projector.0.weight"),
    ("model.feature_adaptor.bias", "lacks feature adaptor weights model.feature_adaptor.bias"),
    ("model.layers.1.mlp.up_proj.weight", "lacks language model weights model.layers.1.mlp.up_proj.weight"),
    ("lm_head.weight", "lacks language model weights lm_head.weight"),
    (NESTED_TOWER + "vision_model.post_layernorm.weight", "lacks CLIP tower weights"),
])
def test_missing_weights_are_errors(tmp_path, drop, match):
    drafter_dir, _ = save_tiny_pair(str(tmp_path))
    rewrite(drafter_dir, lambda s: {n: t for n, t in s.items() if n != drop})
    with pytest.raises(ValueError, match=f"{match}.*randomly initialised"):
        load_eventgpt(drafter_dir)


def test_tower_folder_missing_weights(tmp_path):
    drafter_dir, _ = save_tiny_pair(str(tmp_path), layout="none")
    clip_file = str(tmp_path / TINY_TOWER / "model.safetensors")
    save_file({n: t for n, t in load_file(clip_file).items() if "post_layernorm" not in n}, clip_file,
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="CLIP tower folder .* lacks CLIP tower weights"):
        load_eventgpt(drafter_dir)


def test_added_tokens_resize_the_embeddings(tmp_path, caplog):
    """A checkpoint with rows for <ev_patch> only, whose config asks for <ev_start>/<ev_end> too: the loader adds
    them as the public one does and resizes; the new rows start as the mean row, the trained rows are kept."""
    drafter_dir, _ = save_tiny_pair(str(tmp_path))
    config_path = os.path.join(drafter_dir, "config.json")
    config = json.loads(open(config_path).read())
    config["mm_use_im_start_end"] = True
    open(config_path, "w").write(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        loaded = load_eventgpt(drafter_dir, dtype=torch.float32)
    assert "<ev_start>, <ev_end>" in caplog.text and loaded.added_tokens == ["<ev_patch>", "<ev_start>", "<ev_end>"]
    rows = config["vocab_size"]
    assert loaded.model.config.vocab_size == len(loaded.tokenizer) == rows + 2
    saved = saved_weights(drafter_dir)
    for name, layer in (("model.embed_tokens.weight", loaded.model.get_input_embeddings()),
                        ("lm_head.weight", loaded.model.get_output_embeddings())):
        assert torch.equal(layer.weight[:rows], saved[name])
        assert torch.allclose(layer.weight[rows:], saved[name].mean(0).expand(2, -1))
