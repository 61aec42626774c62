"""StaticKVCache and ModelRunner: fixed buffers grouped by device, slot writes, the committed-slot bias, compaction,
capacity errors, and the lean and transformers forwards agreeing with the model's own forward."""
import pytest
import torch

pytest.importorskip("transformers")

import sdalign_rt as sd  # noqa: E402
from sdalign_rt.kv_cache import CapacityError, StaticKVCache  # noqa: E402
from sdalign_rt.model_runner import ModelRunner, new_cache  # noqa: E402
from test_decoder import DRAFTS, TARGET, left_padded_prompts, reference  # noqa: E402

MIN = torch.finfo(torch.float32).min


def test_layers_on_two_devices_get_two_buffers():
    """A device_map split (layers 0-1 on one device, 2-3 on another) gives one buffer per device, each layer's
    K/V a view of its own device's buffer ('meta' stands in for a second device on a CPU-only machine)."""
    cache = StaticKVCache(["cpu", "cpu", "meta", "meta"], batch=2, kv_heads=3, head_dim=4, capacity=16,
                          dtype=torch.float32)
    assert [tuple(b.shape) for b in cache.buffers] == [(2, 2, 2, 3, 16, 4)] * 2
    assert [b.device.type for b in cache.buffers] == ["cpu", "meta"]
    keys, values = cache.layer(3)
    assert keys.device.type == "meta" and keys.shape == (2, 3, 16, 4)
    assert cache.layer(1)[1].data_ptr() == cache.buffers[0][1, 1].data_ptr()  # a view, not a copy
    assert cache.lengths.device.type == "cpu"  # bookkeeping beside the embeddings


def test_slot_writes_bias_and_compaction():
    cache = StaticKVCache(["cpu"], batch=2, kv_heads=1, head_dim=2, capacity=10, dtype=torch.float32)
    cache.reset(torch.tensor([1, 0]), torch.tensor([3, 2]))  # row 0: one pad slot, then 2 tokens
    assert torch.equal(cache.bias == 0, torch.tensor([[0, 1, 1, 0, 0, 0, 0, 0, 0, 0],
                                                      [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool))
    assert cache.next_positions().tolist() == [2, 2]
    # A tree of 3 nodes at slots length + [0, 1, 2]; node i's keys are i + 1.
    keys, values = cache.layer(0)
    slots = cache.lengths[:, None] + torch.arange(3)
    new = torch.arange(1.0, 4.0).view(1, 1, 3, 1).expand(2, 1, 3, 2)
    StaticKVCache.write(keys, values, new, -new, slots[:, None, :, None].expand(2, 1, 3, 2))
    assert keys[0, 0, 3:6, 0].tolist() == [1, 2, 3] and values[1, 0, 2:5, 0].tolist() == [-1, -2, -3]
    # The tree block at offset length: row t sees block[t] there and the committed slots before it.
    block = torch.tensor([[[0.0, MIN, MIN], [0.0, 0.0, MIN]]])
    bias = cache.attention_bias(block, cache.lengths)
    assert bias.shape == (2, 1, 2, 10)
    assert torch.equal(bias[0, 0] == 0, torch.tensor([[0, 1, 1, 1, 0, 0, 0, 0, 0, 0],
                                                      [0, 1, 1, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool))
    # Row 0 accepts nodes [0, 2], row 1 only the root: node 2's K/V move next to the root.
    cache.compact(torch.tensor([[0, 2], [0, -1]]), cache.lengths)
    assert keys[0, 0, 3:5, 0].tolist() == [1, 3] and keys[1, 0, 2, 0].item() == 1


def test_capacity_is_checked_before_writing():
    cache = StaticKVCache(["cpu"], batch=1, kv_heads=1, head_dim=2, capacity=8, dtype=torch.float32)
    with pytest.raises(CapacityError, match="needs 8 cache slots per row, but the cache holds 7"):
        cache.check_room(8, "the prompt")
    runner = ModelRunner(TARGET, new_cache(TARGET, 1, 8))
    with pytest.raises(CapacityError, match="the prompt needs 9 cache slots"):
        runner.prefill(torch.ones(1, 9, dtype=torch.long), torch.ones(1, 9, dtype=torch.long))


@pytest.mark.parametrize("lean", [True, False])
def test_runner_decodes_like_the_model(lean):
    """Prefill a left-padded batch, then one token at a time: the same tokens as target.generate, through the
    lean forward and through transformers' own."""
    ids, mask = left_padded_prompts([5, 2, 7], 3)
    runner = ModelRunner(TARGET, new_cache(TARGET, 3, 32), lean=lean)
    assert runner.lean is lean
    token = runner.logits(runner.prefill(ids, mask)).argmax(-1)
    out = [token]
    cache = runner.cache
    own = torch.zeros(1, 1, 1)
    for _ in range(9):
        hidden = runner.forward(runner.embed(token[:, None]), cache.next_positions()[:, None], cache.lengths[:, None],
                                cache.attention_bias(own, cache.lengths))
        cache.lengths += 1
        cache.refresh_bias()
        token = runner.logits(hidden[:, -1]).argmax(-1)
        out.append(token)
    assert torch.equal(torch.stack(out, 1), reference(ids, mask, 10)[:, ids.shape[1]:])


def test_decoder_reuses_its_caches_between_calls():
    decoder = sd.SpeculativeDecoder(target=TARGET, draft=DRAFTS["perturbed"], tree=sd.TreeSpec.chain(3))
    ids, mask = left_padded_prompts([6, 3], 1)
    assert torch.equal(decoder.generate(ids, 20, attention_mask=mask).sequences, reference(ids, mask, 20))
    buffers = [b.data_ptr() for b in decoder.idle_workspaces()[0].verifier.cache.buffers]
    ids, mask = left_padded_prompts([4, 5], 2)
    assert torch.equal(decoder.generate(ids, 18, attention_mask=mask).sequences, reference(ids, mask, 18))
    assert [b.data_ptr() for b in decoder.idle_workspaces()[0].verifier.cache.buffers] == buffers
