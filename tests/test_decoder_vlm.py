"""SpeculativeDecoder over VLM verifiers: Llava (image) and Video-LLaVA (8-frame video), greedy losslessness."""
import pytest
import torch

pytest.importorskip("transformers")
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,  # noqa: E402
                          VideoLlavaConfig, VideoLlavaForConditionalGeneration)

import sdalign_rt as sd  # noqa: E402
from sdalign_rt.models.tiny import finish_random_model  # noqa: E402
from test_decoder import TREES, VOCAB, tiny_llama  # noqa: E402

TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14, projection_dim=32)
IMAGE_TOKEN, VIDEO_TOKEN = 95, 94
IMAGE_TOKENS, VIDEO_TOKENS = 4, 40  # 2x2 patches (CLS dropped); 8 frames x (2x2 patches + CLS)


def tiny_llava(seed):
    torch.manual_seed(seed)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=LlamaConfig(**TEXT),
                         image_token_index=IMAGE_TOKEN)
    config._attn_implementation = "eager"
    return finish_random_model(LlavaForConditionalGeneration(config))


def tiny_video_llava(seed):
    torch.manual_seed(seed)
    config = VideoLlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=LlamaConfig(**TEXT),
                              video_token_index=VIDEO_TOKEN, image_token_index=IMAGE_TOKEN)
    config._attn_implementation = "eager"
    return finish_random_model(VideoLlavaForConditionalGeneration(config))


def prompt(media_token, count, seed, lengths=(3, 5)):
    """Left-padded prompts: text, the media placeholder tokens, text."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.cat([torch.randint(1, 90, (n,), generator=gen), torch.full((count,), media_token),
                       torch.randint(1, 90, (4,), generator=gen)]) for n in lengths]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = r
        mask[b, width - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("tree", ["chain4", "static", "dynamic"])
def test_llava_pair_with_images(tree):
    target, draft = tiny_llava(0), tiny_llava(1)
    ids, mask = prompt(IMAGE_TOKEN, IMAGE_TOKENS, 0)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    expected = target.generate(ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=14, do_sample=False)
    out = sd.SpeculativeDecoder(target=target, draft=draft, tree=TREES[tree]).generate(
        ids, 14, attention_mask=mask, target_inputs={"pixel_values": pixels}, draft_inputs={"pixel_values": pixels})
    assert torch.equal(out.sequences, expected)


@pytest.mark.parametrize("aligned", [False, True])
def test_video_llava_verifier_with_a_text_drafter(aligned):
    """The drafter reads its own (text-only) prompt; the verifier sees 8 video frames."""
    target = tiny_video_llava(0)
    draft = tiny_llama(3, hidden=32)
    ids, mask = prompt(VIDEO_TOKEN, VIDEO_TOKENS, 2)
    draft_ids = torch.randint(1, 90, (2, 6), generator=torch.Generator().manual_seed(3))
    video = torch.randn(2, 8, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    expected = target.generate(ids, attention_mask=mask, pixel_values_videos=video, max_new_tokens=14,
                               do_sample=False)
    adapter = sd.BottleneckAdapter(32, 16, out_size=64) if aligned else None
    out = sd.SpeculativeDecoder(target=target, draft=draft, adapter=adapter, tree=TREES["static"]).generate(
        ids, 14, attention_mask=mask, draft_input_ids=draft_ids, target_inputs={"pixel_values_videos": video})
    assert torch.equal(out.sequences, expected)


def test_video_llava_self_drafting_accepts_everything():
    """The verifier as its own drafter (same video): every draft accepted, tau == depth + 1."""
    target = tiny_video_llava(0)
    ids, mask = prompt(VIDEO_TOKEN, VIDEO_TOKENS, 5)
    video = torch.randn(2, 8, 3, 28, 28, generator=torch.Generator().manual_seed(6))
    spec = TREES["chain4"]
    out = sd.SpeculativeDecoder(target=target, draft=target, tree=spec).generate(
        ids, 1 + 2 * (spec.depth + 1), attention_mask=mask, target_inputs={"pixel_values_videos": video},
        draft_inputs={"pixel_values_videos": video})
    expected = target.generate(ids, attention_mask=mask, pixel_values_videos=video, max_new_tokens=11, do_sample=False)
    assert torch.equal(out.sequences, expected)
    assert out.stats["mean_accepted"] == spec.depth + 1
