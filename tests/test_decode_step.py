"""DecodeStep: the device side of a step is capture-safe (no host sync, outputs only in its own buffers, nothing
left alive), equals the eager loop, captures as a CUDA graph where there is a GPU; one decoder serves several
threads at once; an interrupted call leaves the decoder correct."""
import copy
import gc
import threading
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers")

import sdalign_rt as sd  # noqa: E402
from conftest import DEVICE  # noqa: E402
from test_decoder import DRAFTS, TARGET, TREES, left_padded_prompts, reference, tiny_llama  # noqa: E402
from test_lean_step import sync_free_backend  # noqa: E402

# aten ops that wait for the device (read a value back) or copy host data in (torch.tensor(list) inside a step
# is a pageable host-to-device copy on CUDA, which a graph cannot hold).
HOST_OPS = ("_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "masked_select", "unique",
            "lift_fresh", "_assert_async", "allclose")


class Recorder(TorchDispatchMode):
    """Every aten op a region runs, and a weak reference to every tensor it produces."""

    def __init__(self):
        super().__init__()
        self.ops, self.outputs = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(func.__name__)
        for tensor in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(tensor, torch.Tensor):
                self.outputs.append(weakref.ref(tensor))
        return out


def owned_storages(step: sd.DecodeStep) -> set:
    """Storage pointers of everything a step may legitimately keep: its buffers, both caches, the plan, the
    drafter's tables and the models' weights."""
    tensors = [step.roots, step.live, step.context, step.uniforms, step.readback, step.host,
               step.drafter_state.previous, step.drafter_state.previous_cached]
    runners = [step.workspace.verifier] + ([step.workspace.drafter] if step.workspace.drafter is not None else [])
    for runner in runners:
        cache = runner.cache
        tensors += [*cache.static_tensors(), cache.lengths, cache.starts, cache.bias]
        tensors += list(runner.model.parameters()) + list(runner.model.buffers())
    if step.plan is not None:
        tensors += [v for v in vars(step.plan).values() if isinstance(v, torch.Tensor)]
        tensors += [t for v in vars(step.plan).values() if isinstance(v, tuple) for t in v
                    if isinstance(t, torch.Tensor)]
    for table in step.drafter._device_tables.values():
        values = table.values() if isinstance(table, dict) else [table]
        tensors += [v for v in values if isinstance(v, torch.Tensor)]
    if step.drafter.adapter is not None:
        tensors += list(step.drafter.adapter.parameters())
    return {t.untyped_storage().data_ptr() for t in tensors}


CASES = {  # (tree, drafter, mode)
    "chain-shared-greedy": ("chain4", "shared", "greedy"),
    "static-own-greedy": ("static", "perturbed", "greedy"),
    "dynamic-own-greedy": ("dynamic", "perturbed", "greedy"),
    "static-shared-sample": ("static", "shared", "sample"),
    "static-own-feature": ("static", "perturbed", "feature"),
    "plain": ("root", None, "greedy"),
}


def on_device(model):
    """The shared test models stay on the CPU (reference() uses them); a GPU run decodes with copies."""
    return copy.deepcopy(model).to(DEVICE) if DEVICE.type == "cuda" else model


def make_decoder(tree, drafter, mode):
    """Every model and the adapter on DEVICE (a graph captures one device's work)."""
    target = on_device(TARGET)
    if drafter is None:
        return sd.SpeculativeDecoder(target=target, draft=None, mode=mode)
    draft = target if drafter == "shared" else on_device(DRAFTS[drafter])
    adapter = sd.BottleneckAdapter(64, 16, context_size=64, device=DEVICE) if drafter == "shared" else None
    return sd.SpeculativeDecoder(target=target, draft=draft, adapter=adapter, tree=TREES[tree], mode=mode,
                                 draft_layers=1 if drafter == "shared" else None, feature_threshold=0.5)


@pytest.mark.parametrize("case", list(CASES))
def test_step_is_capture_safe(case):
    """20 steps of the device side under a dispatch recorder: no op that syncs or copies host data, the step's
    buffers keep their addresses, and no tensor it made outlives it except in those buffers. The tokens read back
    equal greedy decoding (greedy), and the step equals generate's own loop."""
    tree, drafter, mode = CASES[case]
    backend = sync_free_backend(DEVICE)
    decoder = make_decoder(tree, drafter, mode)
    ids, mask = (t.to(DEVICE) for t in left_padded_prompts([6, 4], 3))
    steps, generator = 20, torch.Generator(device=DEVICE).manual_seed(5)
    with sd.ops.use_backend(backend), sd.ops.value_checks(False), decoder.session(2, 192, 192) as step:
        step.prefill(ids, mask, draft_input_ids=ids, draft_attention_mask=mask)
        step.run()  # warm-up: lazy setup outside the recorded steps, as a graph capture warms up
        step.prefill(ids, mask, draft_input_ids=ids, draft_attention_mask=mask)
        first = step.roots.tolist()
        addresses = [t.data_ptr() for t in step.state_tensors()]
        owned = owned_storages(step)
        emitted = [[token] for token in first]
        for _ in range(steps):
            step.draw(generator)
            with Recorder() as recorder:
                step.run()
            gc.collect()
            host_ops = [name for name in recorder.ops if name.split(".")[0] in HOST_OPS]
            assert not host_ops, host_ops
            alive = [ref() for ref in recorder.outputs if ref() is not None]
            leaked = [tuple(t.shape) for t in alive if t.untyped_storage().data_ptr() not in owned]
            assert not leaked, leaked
            assert [t.data_ptr() for t in step.state_tensors()] == addresses
            width = decoder.tree.depth + 1
            for b, row in enumerate(step.read_back()):
                emitted[b] += row[3:3 + width][1:row[0]] + [row[-1]]
    if mode == "greedy":
        expected = reference(ids.cpu(), mask.cpu(), 30)[:, ids.shape[1]:]
        for b in range(2):
            n = min(len(emitted[b]), 30)
            assert emitted[b][:n] == expected[b, :n].tolist(), b


def test_step_objects_are_built_once_and_reused():
    decoder = make_decoder("static", "perturbed", "greedy")
    ids, mask = (t.to(DEVICE) for t in left_padded_prompts([5, 3], 1))
    decoder.generate(ids, 6, attention_mask=mask)
    (workspace,) = decoder.idle_workspaces()
    (step,) = workspace.steps.values()
    buffers = [t.data_ptr() for t in step.state_tensors()]
    decoder.generate(ids, 9, attention_mask=mask)
    assert decoder.idle_workspaces() == [workspace] and list(workspace.steps.values()) == [step]
    assert [t.data_ptr() for t in step.state_tensors()] == buffers


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a GPU")
@pytest.mark.parametrize("case", ["chain-shared-greedy", "static-own-greedy", "dynamic-own-greedy",
                                  "static-shared-sample"])
def test_cuda_graph_replays_the_step(case):
    """On CUDA generate captures the step as one graph and replays it: outputs equal the eager step's."""
    tree, drafter, mode = CASES[case]
    ids, mask = (t.to(DEVICE) for t in left_padded_prompts([6, 4], 3))
    outputs = {}
    for graphs in (False, None):
        decoder = make_decoder(tree, drafter, mode)
        decoder.graphs = graphs
        generator = torch.Generator(device=DEVICE).manual_seed(3)
        out = decoder.generate(ids, 24, attention_mask=mask, generator=generator)
        assert out.stats["graphed"] is (graphs is None)
        outputs[graphs] = out.sequences
    assert torch.equal(outputs[False], outputs[None])
    if mode == "greedy":
        assert torch.equal(outputs[None].cpu(), reference(ids.cpu(), mask.cpu(), 24))


def test_threads_sharing_one_decoder_get_their_solo_outputs():
    """Six threads call generate on one decoder at once (tiny Llama, shallow drafting, chain of 3), each with its
    own prompts and lengths: each gets what it gets alone."""
    model = tiny_llama(0)
    decoder = sd.SpeculativeDecoder(target=model, draft=model, draft_layers=1, tree=sd.TreeSpec.chain(3))
    jobs = [(left_padded_prompts([4 + i % 3, 2 + i], 10 + i), 12 + 3 * i) for i in range(6)]
    solo = [decoder.generate(ids, new, attention_mask=mask).sequences for (ids, mask), new in jobs]
    results, errors = [None] * len(jobs), []
    barrier = threading.Barrier(len(jobs))

    def work(index):
        (ids, mask), new = jobs[index]
        try:
            barrier.wait()
            for _ in range(2):
                results[index] = decoder.generate(ids, new, attention_mask=mask).sequences
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for index, expected in enumerate(solo):
        assert torch.equal(results[index], expected), index
    assert len(decoder.idle_workspaces()) >= 1


def test_an_interrupted_call_leaves_the_decoder_correct():
    """A callback that raises mid-decode: the exception reaches the caller, the workspace goes back to the pool,
    and the next call decodes exactly."""
    decoder = make_decoder("static", "perturbed", "greedy")
    ids, mask = (t.to(DEVICE) for t in left_padded_prompts([6, 3], 7))
    calls = []

    def stop(emitted):
        calls.append(emitted)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        decoder.generate(ids, 20, attention_mask=mask, callback=stop)
    assert len(decoder.idle_workspaces()) == 1
    out = decoder.generate(ids, 20, attention_mask=mask).sequences
    assert torch.equal(out.cpu(), reference(ids.cpu(), mask.cpu(), 20))


@pytest.mark.parametrize("tree", ["chain4", "static"])
@pytest.mark.parametrize("layers", [1, 2])
def test_layer_reuse_equals_the_full_verify_forward(monkeypatch, tree, layers):
    """Drafting from the verifier's own first k layers (k = 2: all of them, a raw state the final norm must see
    once): the verify forward that starts drafted nodes at layer k gives every node the state a full forward
    gives, and the decode stays lossless."""
    model = tiny_llama(3, layers=2)
    full = sd.DecodeStep.verify_forward
    differences = []

    def both(step, draft):
        assert step.reuse_layers
        hidden, logits = full(step, draft)
        step.reuse_layers = False
        plain, _ = full(step, draft)  # rewrites the same slots with the same values
        step.reuse_layers = True
        differences.append(float((hidden - plain).abs().max()))
        return hidden, logits

    monkeypatch.setattr(sd.DecodeStep, "verify_forward", both)
    ids, mask = left_padded_prompts([5, 3], 2)
    adapter = sd.BottleneckAdapter(64, 8, context_size=64)
    decoder = sd.SpeculativeDecoder(target=model, draft=model, adapter=adapter, tree=TREES[tree], draft_layers=layers)
    out = decoder.generate(ids, 14, attention_mask=mask)
    assert decoder.reuse_layers and differences and max(differences) < 1e-4, differences
    assert torch.equal(out.sequences, model.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False))


def test_layer_reuse_applies_only_where_it_is_exact():
    model = tiny_llama(3, layers=2)
    assert not sd.SpeculativeDecoder(target=model, draft=model, tree=TREES["dynamic"], draft_layers=1).reuse_layers
    assert not sd.SpeculativeDecoder(target=model, draft=DRAFTS["perturbed"], tree=TREES["static"]).reuse_layers
    assert not sd.SpeculativeDecoder(target=model, draft=model, tree=TREES["static"], draft_layers=1,
                                     reuse_layers=False).reuse_layers
    assert not sd.SpeculativeDecoder(target=model, draft=model, tree=TREES["static"], draft_layers=1,
                                     lean=False).reuse_layers
