#!/usr/bin/env bash
# Launch the UnifiedReward judge (CodeGoat24/UnifiedReward-7b-v1.5, a LLaVA-OneVision 7B fine-tune) with
# sglang's OpenAI-compatible server, as Flow-GRPO does. Needs a GPU with ~24 GB (bf16 weights + KV cache).
# The `unifiedreward` reward (flowgrpo_core/rewards/unifiedreward.py) is its client:
#   --option url=http://<this host>:${UNIFIEDREWARD_PORT}/v1, key in UNIFIEDREWARD_API_KEY on both sides.
#
# Environment (all optional):
#   UNIFIEDREWARD_MODEL     hub id or local folder (default: CodeGoat24/UnifiedReward-7b-v1.5)
#   UNIFIEDREWARD_HOST      interface to bind (default: 0.0.0.0; the port must stay inside the cluster)
#   UNIFIEDREWARD_PORT      port (default: 17140)
#   UNIFIEDREWARD_API_KEY   bearer key the server requires (strongly recommended off a laptop)
#   MEM_FRACTION            share of GPU memory for weights + KV cache (default: 0.85)
#   TP_SIZE / DP_SIZE       tensor / data parallel sizes (default: 1 / 1)
# Extra arguments are passed to sglang.launch_server (e.g. --max-running-requests 64).
set -euo pipefail

args=(
  --model-path "${UNIFIEDREWARD_MODEL:-CodeGoat24/UnifiedReward-7b-v1.5}"
  --served-model-name UnifiedReward-7b-v1.5        # the client's default `model`
  --chat-template chatml-llava                     # the template the judge was fine-tuned with
  --host "${UNIFIEDREWARD_HOST:-0.0.0.0}"
  --port "${UNIFIEDREWARD_PORT:-17140}"
  --mem-fraction-static "${MEM_FRACTION:-0.85}"
  --tp-size "${TP_SIZE:-1}"
  --dp-size "${DP_SIZE:-1}"
  --enable-p2p-check
)
if [[ -n "${UNIFIEDREWARD_API_KEY:-}" ]]; then
  # sglang takes the key only as an argument; it is visible to `ps` inside this container only
  args+=(--api-key "${UNIFIEDREWARD_API_KEY}")
fi
exec python3 -m sglang.launch_server "${args[@]}" "$@"
