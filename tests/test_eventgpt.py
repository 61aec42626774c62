"""EventGPT: checkpoint layout and round trip, event encoding, placeholders, drafting for a Video-LLaVA verifier."""
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

import sdalign_rt as sd  # noqa: E402
from sdalign_rt.models.tiny import finish_random_model  # noqa: E402
from sdalign_rt.models import events as ev  # noqa: E402
from sdalign_rt.models.eventgpt import (EVENT_TOKEN_INDEX, EventGPTConfig, EventGPTForCausalLM,  # noqa: E402
                                        expand_event_placeholder)
from test_decoder import TREES, VOCAB  # noqa: E402
from test_decoder_vlm import VIDEO_TOKEN, VIDEO_TOKENS, VISION, prompt, tiny_video_llava  # noqa: E402

IMAGES, SPATIAL = 5, 5  # 5 event images; a 28 px CLIP with 14 px patches: 4 patches + CLS


def tiny_eventgpt(seed: int = 0) -> EventGPTForCausalLM:
    torch.manual_seed(seed)
    config = EventGPTConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            vision_config=VISION, mm_visual_tower="openai/clip-vit-large-patch14-336")
    config._attn_implementation = "eager"
    return finish_random_model(EventGPTForCausalLM(config))


def event_pixels(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, IMAGES, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_checkpoint_layout_and_round_trip(tmp_path):
    model = tiny_eventgpt()
    names = set(model.state_dict())
    for expected in ("model.visual_projector.0.weight", "model.visual_projector.2.weight",
                     "model.feature_adaptor.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):
        assert expected in names
    assert any(n.startswith("model.visual_tower.visual_tower.") for n in names)  # the public module tree
    model.save_pretrained(tmp_path / "eventgpt")
    config_text = (tmp_path / "eventgpt" / "config.json").read_text()
    assert '"model_type": "EventChat_llama"' in config_text and '"event_feature_adaptor": true' in config_text
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "eventgpt")
    assert isinstance(loaded, EventGPTForCausalLM)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_spatio_temporal_pooling():
    model = tiny_eventgpt()
    pixels = event_pixels(2, 1)
    features = model.encode_events(pixels)
    assert features.shape == (2, IMAGES + SPATIAL, 64)
    with torch.no_grad():
        clip = model.model.visual_tower.visual_tower  # the public VisualTower's CLIPVisionModel
        tokens = model.model.feature_adaptor(model.model.visual_projector(
            clip(pixel_values=pixels.flatten(0, 1)).last_hidden_state)).view(2, IMAGES, SPATIAL, 64)
    torch.testing.assert_close(features[:, :IMAGES], tokens.mean(2))
    torch.testing.assert_close(features[:, IMAGES:], tokens.mean(1))


def test_placeholders_take_the_features():
    model = tiny_eventgpt()
    pixels = event_pixels(1, 2)
    ids = expand_event_placeholder(torch.tensor([3, 7, EVENT_TOKEN_INDEX, 9]), IMAGES + SPATIAL)[None]
    assert ids.shape == (1, 3 + IMAGES + SPATIAL)
    embeds = model.embed_with_events(ids, pixels)
    torch.testing.assert_close(embeds[0, 2:2 + IMAGES + SPATIAL], model.encode_events(pixels)[0])
    torch.testing.assert_close(embeds[0, -1], model.model.embed_tokens.weight[9])
    with pytest.raises(ValueError, match="each row needs 10 event placeholders"):
        model.embed_with_events(torch.tensor([[3, EVENT_TOKEN_INDEX, 9]]), pixels)
    with pytest.raises(ValueError, match="no event_pixel_values"):
        model.embed_with_events(ids)
    with pytest.raises(ValueError, match="exactly one event marker"):
        expand_event_placeholder(torch.tensor([1, 2, 3]), 4)


def test_events_to_images_to_features():
    """An event stream through the whole drafter input path: render, resize, encode."""
    rng = np.random.default_rng(0)
    n = 500
    stream = {"x": rng.integers(0, 64, n), "y": rng.integers(0, 48, n), "p": rng.integers(0, 2, n),
              "t": np.sort(rng.integers(0, 10**6, n))}
    images = ev.render_event_images(stream, parts=IMAGES)
    pixels = torch.stack([torch.nn.functional.interpolate(
        torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255, size=(28, 28))[0] for im in images])[None]
    assert tiny_eventgpt().encode_events(pixels).shape == (1, IMAGES + SPATIAL, 64)


@pytest.mark.parametrize("tree", ["chain4", "static", "dynamic"])
@pytest.mark.parametrize("aligned", [False, True])
def test_eventgpt_drafts_for_video_llava(tree, aligned):
    """The mission's pair in miniature: EventGPT (events) drafts, Video-LLaVA (8 frames) verifies, losslessly."""
    target, draft = tiny_video_llava(0), tiny_eventgpt(1)
    ids, mask = prompt(VIDEO_TOKEN, VIDEO_TOKENS, 2)
    video = torch.randn(2, 8, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    draft_ids = torch.stack([expand_event_placeholder(torch.tensor([1, 5, EVENT_TOKEN_INDEX, 8, 9]), IMAGES + SPATIAL)
                             for _ in range(2)])
    expected = target.generate(ids, attention_mask=mask, pixel_values_videos=video, max_new_tokens=12,
                               do_sample=False)
    adapter = sd.BottleneckAdapter(64, 16) if aligned else None
    out = sd.SpeculativeDecoder(target=target, draft=draft, adapter=adapter, tree=TREES[tree]).generate(
        ids, 12, attention_mask=mask, draft_input_ids=draft_ids, target_inputs={"pixel_values_videos": video},
        draft_inputs={"event_pixel_values": event_pixels(2, 5)})
    assert torch.equal(out.sequences, expected)
