"""Shallow drafting (draft_layers=k): the view shares weights, returns layer-k states, keeps a k-layer cache,
and decoding through it stays lossless."""
import pytest
import torch

pytest.importorskip("transformers")

import sdalign_rt as sd  # noqa: E402
from sdalign_rt.model_runner import new_cache  # noqa: E402
from sdalign_rt.shallow import shallow_view  # noqa: E402
from test_decoder import TREES, left_padded_prompts, tiny_llama  # noqa: E402

TARGET4 = tiny_llama(0, layers=4)


def generate_reference(ids, mask, new):
    return TARGET4.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_view_returns_layer_k_states_and_shares_weights(k):
    ids = torch.randint(1, 90, (2, 7), generator=torch.Generator().manual_seed(k))
    view = shallow_view(TARGET4, k)
    with torch.no_grad():
        full = TARGET4(ids, output_hidden_states=True).hidden_states
        mine = view(input_ids=ids).last_hidden_state
    if k < 4:
        torch.testing.assert_close(mine, full[k], rtol=0, atol=1e-6)
    else:  # the last entry of hidden_states is the normed final state
        torch.testing.assert_close(TARGET4.model.norm(mine), full[4], rtol=0, atol=1e-6)
    own = {p.data_ptr() for p in TARGET4.parameters()}
    assert all(p.data_ptr() in own for p in view.parameters())  # no copy
    assert len(TARGET4.model.layers) == 4 and TARGET4.config.num_hidden_layers == 4  # the model is untouched
    assert new_cache(TARGET4, 2, 16, num_layers=k).num_layers == k  # a k-layer KV cache


@pytest.mark.parametrize("tree", ["chain4", "static", "dynamic"])
@pytest.mark.parametrize("lengths", [[5], [6, 3]])
def test_self_speculative_first_layer_is_lossless(tree, lengths):
    ids, mask = left_padded_prompts(lengths, len(lengths))
    out = sd.SpeculativeDecoder(target=TARGET4, draft=TARGET4, tree=TREES[tree], draft_layers=1).generate(
        ids, 18, attention_mask=mask)
    assert torch.equal(out.sequences, generate_reference(ids, mask, 18))


@pytest.mark.parametrize("mode", ["greedy", "feature"])
def test_aligned_shallow_drafting(mode):
    ids, mask = left_padded_prompts([4, 7], 3)
    adapter = sd.BottleneckAdapter(64, 16)
    torch.nn.init.normal_(adapter.up.weight, std=0.02)
    decoder = sd.SpeculativeDecoder(target=TARGET4, draft=TARGET4, adapter=adapter, tree=TREES["static"],
                                    draft_layers=2, mode=mode, feature_threshold=1.5)
    assert torch.equal(decoder.generate(ids, 15, attention_mask=mask).sequences, generate_reference(ids, mask, 15))


def test_full_depth_view_drafts_like_the_model_itself():
    """k = all layers: norm + head on the raw last state are the model's own logits: every draft accepted."""
    ids, mask = left_padded_prompts([5, 5], 4)
    spec = TREES["chain4"]
    out = sd.SpeculativeDecoder(target=TARGET4, draft=TARGET4, tree=spec, draft_layers=4).generate(
        ids, 1 + 2 * (spec.depth + 1), attention_mask=mask)
    assert out.stats["mean_accepted"] == spec.depth + 1


@pytest.mark.parametrize("k", [0, 5, "2", 1.0])
def test_out_of_range(k):
    with pytest.raises(ValueError, match=r"draft_layers must be an int in \[1, 4\]"):
        sd.SpeculativeDecoder(target=TARGET4, draft=TARGET4, draft_layers=k)


@pytest.mark.parametrize("tree", ["chain4", "dynamic"])
def test_shallow_eventgpt_drafter_for_video_llava(tree):
    """EventGPT's first layer drafts for Video-LLaVA: the events reach the k-layer view through the full
    drafter's merged embeddings."""
    from sdalign_rt.models.eventgpt import EVENT_TOKEN_INDEX, expand_event_placeholder
    from test_decoder_vlm import VIDEO_TOKEN, VIDEO_TOKENS, prompt, tiny_video_llava
    from test_eventgpt import IMAGES, SPATIAL, event_pixels, tiny_eventgpt

    target, draft = tiny_video_llava(0), tiny_eventgpt(1)
    ids, mask = prompt(VIDEO_TOKEN, VIDEO_TOKENS, 2)
    video = torch.randn(2, 8, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    draft_ids = torch.stack([expand_event_placeholder(torch.tensor([1, 5, EVENT_TOKEN_INDEX, 8]), IMAGES + SPATIAL)] * 2)
    expected = target.generate(ids, attention_mask=mask, pixel_values_videos=video, max_new_tokens=12, do_sample=False)
    out = sd.SpeculativeDecoder(target=target, draft=draft, tree=TREES[tree], draft_layers=1).generate(
        ids, 12, attention_mask=mask, draft_input_ids=draft_ids, target_inputs={"pixel_values_videos": video},
        draft_inputs={"event_pixel_values": event_pixels(2, 5)})
    assert torch.equal(out.sequences, expected)


def test_shallow_llava_drafter_with_images_matches_its_own_layers():
    """A Llava drafter cut to 1 layer: the prefill through merged embeddings gives the full model's layer-1
    states, and decoding stays lossless."""
    from sdalign_rt.shallow import merged_input_embeddings
    from test_decoder_vlm import IMAGE_TOKEN, IMAGE_TOKENS, prompt, tiny_llava

    target, draft = tiny_llava(0), tiny_llava(1)
    ids, mask = prompt(IMAGE_TOKEN, IMAGE_TOKENS, 0)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embeds = merged_input_embeddings(draft, ids, attention_mask=mask, pixel_values=pixels)
        full = draft(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(embeds, full[0])
    expected = target.generate(ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=12, do_sample=False)
    out = sd.SpeculativeDecoder(target=target, draft=draft, tree=TREES["static"], draft_layers=1).generate(
        ids, 12, attention_mask=mask, target_inputs={"pixel_values": pixels}, draft_inputs={"pixel_values": pixels})
    assert torch.equal(out.sequences, expected)


@pytest.mark.parametrize("lengths", [[5], [6, 3]])
@pytest.mark.parametrize("tree", ["chain4", "dynamic"])
def test_shallow_drafting_through_a_normed_reduced_vocab_adapter(lengths, tree):
    """The demo's drafter: layer-k states → input norm → adapter → the verifier's head restricted to a draft
    vocabulary. Greedy output stays the verifier's."""
    ids, mask = left_padded_prompts(lengths, 7)
    adapter = sd.BottleneckAdapter(64, 16, input_norm=True, draft_vocab=torch.arange(0, 90, 3))
    torch.nn.init.normal_(adapter.up.weight, std=0.02)
    decoder = sd.SpeculativeDecoder(target=TARGET4, draft=TARGET4, adapter=adapter, tree=TREES[tree], draft_layers=2)
    assert torch.equal(decoder.generate(ids, 14, attention_mask=mask).sequences, generate_reference(ids, mask, 14))


def _tiny(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    llama_like = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, max_position_embeddings=256)
    config = {"qwen2": lambda: tf.Qwen2Config(num_key_value_heads=2, **llama_like),
              "gpt_neox": lambda: tf.GPTNeoXConfig(**llama_like),  # layers + final_layer_norm
              "gpt2": lambda: tf.GPT2Config(vocab_size=100, n_embd=64, n_layer=3, n_head=4)}[kind]()  # h + ln_f
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    from sdalign_rt.models.tiny import finish_random_model

    return finish_random_model(model)


@pytest.mark.parametrize("kind", ["qwen2", "gpt_neox", "gpt2"])
def test_other_architectures_draft_from_their_first_layer(kind):
    """The view finds each family's block list and final norm; self-speculative decoding stays lossless."""
    model = _tiny(kind)
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    for tree in (sd.TreeSpec.chain(3), sd.TreeSpec.dynamic(2, 3, 5)):
        out = sd.SpeculativeDecoder(model, model, tree=tree, draft_layers=1).generate(ids, 12, attention_mask=mask)
        assert torch.equal(out.sequences, expected)


def test_a_model_without_a_known_layer_list_is_refused():
    class Odd(torch.nn.Module):
        def get_decoder(self):
            return torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="cannot find the decoder layer list of Linear"):
        shallow_view(Odd(), 1)


def test_a_view_never_shifts_the_full_models_hidden_states():
    """A view used (with hidden states requested) before the full model ever returned hidden states must not
    make the full model record its shared layers twice: output_hidden_states[k] stays layer k's output."""
    model = tiny_llama(5, layers=4)
    reference = tiny_llama(5, layers=4)
    ids = torch.randint(1, 90, (1, 6), generator=torch.Generator().manual_seed(2))
    view = shallow_view(model, 2)
    with torch.no_grad():
        view(input_ids=ids, output_hidden_states=True)
        mine = model(input_ids=ids, output_hidden_states=True).hidden_states
        expected = reference(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(mine) == len(expected) == 5
    for a, b in zip(mine, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_feature_mode_applies_the_adapters_input_norm():
    """Feature mode's fused adapter + cosine path must see the adapter's input norm too. Drafter = verifier cut
    at all its layers (raw last state) and an identity adapter whose input norm is the model's final norm:
    the adapted state is the verifier's own state, so every draft passes a 0.999 threshold and the output is
    the verifier's."""
    model = tiny_llama(3, layers=2)
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.rand(64, generator=torch.Generator().manual_seed(0)) * 2 + 0.1)
    ids, mask = left_padded_prompts([5, 3], 2)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=11, do_sample=False)
    adapter = sd.BottleneckAdapter(64, 8, input_norm=True, norm_eps=model.config.rms_norm_eps)
    with torch.no_grad():
        adapter.norm.copy_(model.model.norm.weight)
    out = sd.SpeculativeDecoder(target=model, draft=model, adapter=adapter, mode="feature", tree=TREES["chain4"],
                                draft_layers=2, feature_threshold=0.999).generate(ids, 11, attention_mask=mask)
    assert out.stats["acceptance_rate"] == 1.0 and out.stats["feature_mismatches"] == 0
    assert torch.equal(out.sequences, expected)
