"""`import sdalign_rt` stays light: transformers, triton and matplotlib load only where they are used."""
import subprocess
import sys


def test_import_loads_no_transformers_triton_or_matplotlib():
    code = ("import sys, sdalign_rt; "
            "print(sorted(m for m in ('transformers', 'triton', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
