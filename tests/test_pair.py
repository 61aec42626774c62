"""The real pair's path on tiny checkpoints: save / load (safetensors, .bin, bf16, 4-bit), prepare, lossless
speculative decoding with and without an adapter, vocabulary checks, pair-check for each EventGPT layout and
token setting."""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

import sdalign_rt as sd  # noqa: E402

from sdalign_rt import cli  # noqa: E402
from sdalign_rt.models import PairSample, load_pair, save_tiny_pair, synthetic_sample  # noqa: E402
from test_decoder import TREES  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pair"))
    drafter_dir, verifier_dir = save_tiny_pair(root)
    return drafter_dir, verifier_dir, synthetic_sample(root)


def verifier_greedy(pair, inputs, new):
    return pair.verifier.generate(inputs.input_ids, attention_mask=inputs.attention_mask, max_new_tokens=new,
                                  do_sample=False, **inputs.target_inputs)


def test_layout_and_prepare(tiny):
    drafter_dir, verifier_dir, sample = tiny
    assert os.path.isfile(os.path.join(drafter_dir, "model.safetensors"))
    config = json.load(open(os.path.join(drafter_dir, "config.json")))
    assert config["model_type"] == "EventChat_llama" and config["event_feature_adaptor"] is True
    assert config["mm_use_im_patch_token"] is True and config["mm_use_im_start_end"] is False
    pair = load_pair(drafter_dir, verifier_dir, dtype=torch.float32)
    inputs = pair.prepare(sample)
    video_id = pair.verifier.config.video_token_index
    assert int((inputs.input_ids == video_id).sum()) == 8 * 5  # 8 frames x (2x2 patches + CLS)
    assert int((inputs.draft_input_ids == -200).sum()) == pair.event_token_count() == 5 + 5
    assert inputs.target_inputs["pixel_values_videos"].shape == (1, 8, 3, 28, 28)
    assert inputs.draft_inputs["event_pixel_values"].shape == (1, 5, 3, 28, 28)
    # the LLaMA part is shared; each side's added tokens (<ev_patch> vs <video>, on the same id) are not
    ev_patch = pair.drafter_tokenizer.convert_tokens_to_ids("<ev_patch>")
    assert ev_patch == video_id - 1 == pair.drafter.get_input_embeddings().num_embeddings - 1
    assert int(pair.vocab_map.to_target[ev_patch]) == -1 and int(pair.vocab_map.to_draft[video_id]) == -1
    assert pair.vocab_map.to_target[:ev_patch].tolist() == list(range(ev_patch))


@pytest.mark.parametrize("tree", ["chain4", "static", "dynamic"])
@pytest.mark.parametrize("aligned", [False, True])
def test_tiny_pair_is_lossless(tiny, tree, aligned):
    drafter_dir, verifier_dir, sample = tiny
    pair = load_pair(drafter_dir, verifier_dir, dtype=torch.float32)
    inputs = pair.prepare(sample)
    adapter = None
    if aligned:
        adapter = sd.BottleneckAdapter(64, 16)
        torch.nn.init.normal_(adapter.up.weight, std=0.05)
    out = pair.decoder(adapter=adapter, tree=TREES[tree]).generate(inputs.input_ids, 20, **inputs.generate_kwargs())
    assert torch.equal(out.sequences, verifier_greedy(pair, inputs, 20))


def test_bin_shards_and_bf16(tmp_path):
    drafter_dir, verifier_dir = save_tiny_pair(str(tmp_path), seed=3, safe_serialization=False)
    assert any(name.endswith(".bin") for name in os.listdir(drafter_dir))
    sample = synthetic_sample(str(tmp_path), seed=3)
    reference = load_pair(drafter_dir, verifier_dir, dtype=torch.float32)
    pair = load_pair(drafter_dir, verifier_dir, dtype=torch.bfloat16)
    assert pair.drafter.dtype == torch.bfloat16 and pair.verifier.dtype == torch.bfloat16
    for name, tensor in reference.drafter.state_dict().items():
        torch.testing.assert_close(pair.drafter.state_dict()[name].float(), tensor.to(torch.bfloat16).float())
    inputs = pair.prepare(sample)
    out = pair.decoder(tree=TREES["chain4"]).generate(inputs.input_ids, 12, **inputs.generate_kwargs())
    assert torch.equal(out.sequences, verifier_greedy(pair, inputs, 12))


def test_4bit_on_cpu(tiny):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    drafter_dir, verifier_dir, sample = tiny
    pair = load_pair(drafter_dir, verifier_dir, dtype=torch.float32, load_in_4bit=True)
    assert type(pair.drafter.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    inputs = pair.prepare(sample)
    out = pair.decoder(tree=TREES["static"]).generate(inputs.input_ids, 12, **inputs.generate_kwargs())
    assert torch.equal(out.sequences, verifier_greedy(pair, inputs, 12))


def test_vocabularies_that_disagree_are_refused(tiny):
    drafter_dir, verifier_dir, _ = tiny
    pair = load_pair(drafter_dir, verifier_dir, dtype=torch.float32)
    vocab = pair.drafter_tokenizer.get_vocab()
    swapped = {**vocab, "▁car": vocab["▁road"], "▁road": vocab["▁car"]}
    with pytest.raises(ValueError, match="disagree on 2 shared tokens"):
        sd.VocabMap.from_vocabularies(swapped, pair.verifier_processor.tokenizer.get_vocab(), len(vocab), 52)


def test_bad_input(tiny, tmp_path):
    drafter_dir, verifier_dir, sample = tiny
    with pytest.raises(FileNotFoundError, match="drafter checkpoint directory"):
        load_pair(str(tmp_path / "missing"), verifier_dir)
    pair = load_pair(drafter_dir, verifier_dir, dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match="event file"):
        pair.prepare(PairSample(events=str(tmp_path / "none.npy"), frames=sample.frames))
    with pytest.raises(ValueError, match="t is not sorted"):
        pair.prepare(PairSample(events={"x": [1, 2, 3, 4, 5], "y": [0] * 5, "p": [0, 1, 0, 1, 0],
                                                       "t": [5, 4, 3, 2, 1]}, frames=sample.frames))


@pytest.mark.parametrize("extra", [[], ["--draft-layers", "1"], ["--tiny-layout", "flat"],
                                   ["--tiny-layout", "none", "--tiny-start-end"], ["--tiny-start-end"]])
def test_pair_check_cli(tmp_path, capsys, extra):
    report = tmp_path / "pair.json"
    assert cli.main(["pair-check", "--tiny", "--dir", str(tmp_path), "--max-new-tokens", "10", "--tree",
                     "dynamic:2,3,5", "--json", str(report), *extra]) == 0
    result = json.loads(report.read_text())
    assert result["lossless"] is True and '"lossless": true' in capsys.readouterr().out
    assert result["drafter_layout"] == (extra[1] if extra[:1] == ["--tiny-layout"] else "nested")
    start_end = "--tiny-start-end" in extra
    assert result["drafter_event_tokens"] == (["<ev_patch>", "<ev_start>", "<ev_end>"] if start_end else ["<ev_patch>"])
