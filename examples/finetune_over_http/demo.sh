#!/usr/bin/env bash
# `make demo-api`: serve the built-in model with the fine-tuning API, run finetune.py against it (upload, job,
# events, chat), then stop the endpoint. The job template mirrors configs/quickstart.yaml's speed settings
# (bf16 where the CPU has it, packed rows, LoRA on the top 12 layers, 4 rows per step on 2 workers).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN="${VENV:-.venv}/bin"
PORT="${PORT:-8000}"
"$BIN/rayft" serve smollm2-135m-instruct --port "$PORT" \
  --set serve.finetune.storage_path=runs/service \
  --set serve.finetune.job.training.precision=fast \
  --set serve.finetune.job.training.lora.last_layers=12 \
  --set serve.finetune.job.training.micro_batch_size=2 \
  --set serve.finetune.job.training.global_batch_size=4 \
  --set serve.finetune.job.data.packing=true \
  --set serve.finetune.job.data.max_seq_len=512 &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
"$BIN/python" - "$PORT" "$server" <<'PY'
import os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 600
while time.time() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("rayft serve exited before the endpoint was ready")
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10).status == 200:
            sys.exit(0)
    except OSError:
        pass
    time.sleep(2)
sys.exit("the endpoint did not become ready in 10 minutes")
PY
RAYFT_URL="http://127.0.0.1:$PORT" "$BIN/python" examples/finetune_over_http/finetune.py
