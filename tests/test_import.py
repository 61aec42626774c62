"""`import sdalign_rt` stays light: transformers, triton and matplotlib load only where they are used."""
import os
import subprocess
import sys


def test_import_loads_no_transformers_triton_or_matplotlib():
    code = ("import sys, sdalign_rt; "
            "print(sorted(m for m in ('transformers', 'triton', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_cpu_decoding_works_without_triton_or_matplotlib(tmp_path):
    """Off Linux there is no triton wheel, and matplotlib is an extra: with both unimportable, a decode on the CPU
    still runs (C++ or reference ops) and a result writer still writes its JSON."""
    code = """
import sys, json, os, warnings
sys.modules['triton'] = None
sys.modules['matplotlib'] = None
import torch
from transformers import LlamaConfig, LlamaForCausalLM
import sdalign_rt as sd
from sdalign_rt.eval_alignment import write_report
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
ids = torch.randint(1, 64, (1, 5))
out = sd.SpeculativeDecoder(model, model, draft_layers=1, tree=sd.TreeSpec.chain(2)).generate(ids, 6)
assert torch.equal(out.sequences, model.generate(ids, max_new_tokens=6, do_sample=False))
assert 'triton' not in sd.ops.available_backends('cpu')
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    write_report({'x': 1}, os.path.join(sys.argv[1], 'report.json'))
assert json.load(open(os.path.join(sys.argv[1], 'report.json'))) == {'x': 1}
assert any('matplotlib is not installed' in str(w.message) for w in caught)
print('ok')
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_help_loads_no_model_code():
    """`sdalign-rt --help` builds the whole parser without transformers, triton, matplotlib or gguf: it answers in
    about the time `import torch` takes (1-1.5 s on the CI machine)."""
    code = ("import sys; from sdalign_rt import cli; cli.build_parser(); "
            "print(sorted(m for m in ('transformers', 'triton', 'matplotlib', 'gguf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
