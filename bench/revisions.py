"""Another revision of the repository beside this checkout, for before / after benchmarks run in one session.

`worktree(rev)` checks REV out in a git worktree under /tmp and builds its C++ ops there (so both sides run the
same backends); `run_worker(root, script, args)` runs a benchmark's worker mode inside that tree (its own
`sdalign_rt` first on the path) and returns the JSON object the worker printed last.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def worktree(rev: str) -> str:
    path = os.path.join("/tmp", f"sdalign_rt_before_{rev}")
    if not os.path.isdir(path):
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", path, rev], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=path, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return path


def run_worker(root: str, script: str, args: list[str]) -> dict:
    """`python3 script --worker ARGS` with root's package first on the path; the last printed line, as JSON."""
    env = dict(os.environ, PYTHONPATH=root)
    done = subprocess.run([sys.executable, script, "--worker", *args], cwd=root, env=env, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def head() -> str:
    return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
