"""PreallocatedCache: same attention results as DynamicCache, in-place appends, crops, growth."""
import pytest
import torch

pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

import sdalign_rt as sd  # noqa: E402
from sdalign_rt.kv_cache import PreallocatedCache  # noqa: E402
from sdalign_rt.model_runner import ModelRunner  # noqa: E402
from test_decoder import DRAFTS, TARGET, TREES, left_padded_prompts, reference  # noqa: E402


@pytest.mark.parametrize("capacity", [64, 3])
def test_plain_decoding_matches_dynamic_cache(capacity):
    """Prefill then token-by-token decoding through transformers itself: identical logits; capacity 3
    forces the buffer to double several times."""
    ids = torch.randint(1, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    caches = {"dynamic": DynamicCache(), "preallocated": PreallocatedCache(TARGET.config.num_hidden_layers, capacity)}
    logits = {}
    for name, cache in caches.items():
        with torch.no_grad():
            out = [TARGET(ids, cache=cache, use_cache=True).logits[:, -1]]
            token = out[-1].argmax(-1, keepdim=True)
            for _ in range(6):
                out.append(TARGET(token, cache=cache, use_cache=True).logits[:, -1])
                token = out[-1].argmax(-1, keepdim=True)
        logits[name] = torch.stack(out)
    torch.testing.assert_close(logits["preallocated"], logits["dynamic"], rtol=0, atol=1e-5)
    assert caches["preallocated"].get_seq_length() == 13


def test_crop_and_views():
    cache = PreallocatedCache(2, 8)
    keys = torch.randn(1, 2, 5, 4)
    for layer in range(2):
        cache.update(keys, keys + 1, layer)
    cache.crop(-2)  # remove two tokens
    assert cache.get_seq_length() == 3
    assert torch.equal(cache.layers[1].values, keys[:, :, :3] + 1)
    assert cache.filled().shape == (2, 2, 1, 2, 3, 4)
    assert cache.layers[0].keys.data_ptr() == cache.buffer.data_ptr()  # a view, not a copy


def test_decoder_uses_it_and_survives_growth():
    runner = ModelRunner(TARGET, 2, torch.device("cpu"), capacity=4)
    assert isinstance(runner.cache, PreallocatedCache)
    ids, mask = left_padded_prompts([6, 3], 1)
    decoder = sd.SpeculativeDecoder(target=TARGET, draft=DRAFTS["perturbed"], tree=TREES["static"])
    assert torch.equal(decoder.generate(ids, 30, attention_mask=mask).sequences, reference(ids, mask, 30))
