#!/usr/bin/env bash
# GPU check of rayft on one machine with a single H100 or H200, offline, in at most 8 minutes:
# peak bf16 matmul, `rayft train` ZeRO-2 full finetune and LoRA of a 1.1B Llama (tokens/s, MFU, peak memory),
# GRPO (rollouts on the GPU, grading, LoRA training: completions/s), and `rayft serve` tokens/s at 1 and 32 clients. See bench/gpu_check.py for what is measured and how.
#
#   bench/gpu_check.sh [--bundle DIR] [--dry-run] [--out DIR] [--results FILE] [--steps N]
#
# --bundle DIR  install rayft and its dependencies from an offline bundle (`make offline-bundle`) into a venv that
#               sees this machine's own CUDA torch, transformers and peft. The bundle's Ray is a trimmed
#               wheel of the official release: the Java jars, RLlib, the example folders and the dashboard's
#               source maps are left out (rayft uses none of them); see DIR/MANIFEST.md.
# --dry-run     the same path on CPU with tiny sizes (no GPU needed; a test runs it).
# Other options go to bench/gpu_check.py. Python: $PYTHON, else .venv/bin/python, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."

export GPU_CHECK_COMMAND="bench/gpu_check.sh $*"  # recorded in RESULTS.md
bundle="" ; args=() ; dry=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --bundle) bundle="${2:?--bundle needs a folder}"; shift 2 ;;
    --bundle=*) bundle="${1#--bundle=}"; shift ;;
    --dry-run) dry=1; args+=("$1"); shift ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) args+=("$1"); shift ;;
  esac
done

python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi

if [[ -n "$bundle" ]]; then
  if ! ls "$bundle"/*.whl >/dev/null 2>&1; then
    echo "gpu_check: no wheels in $bundle; build the bundle with 'make offline-bundle BUNDLE_DIR=$bundle'" >&2
    exit 2
  fi
  env_dir="${RAYFT_CHECK_ENV:-${TMPDIR:-/tmp}/rayft-check-env}"
  echo "gpu_check: installing $(ls "$bundle"/*.whl | wc -l) wheels from $bundle into $env_dir (offline;" \
       "Ray is a trimmed wheel: no Java jars, RLlib, examples or dashboard source maps)"
  "$python" -m venv --system-site-packages "$env_dir"
  "$env_dir/bin/python" -m pip install --quiet --no-index --no-deps --no-compile "$bundle"/*.whl
  python="$env_dir/bin/python"
fi

export PYTHONUNBUFFERED=1  # rayft itself is installed: from the bundle, or in .venv by make setup
limit=480  # the check's budget on a GPU; the CPU dry run gets longer on slow shared machines
[[ $dry -eq 1 ]] && limit=900
exec timeout --signal=INT --kill-after=30 "$limit" "$python" bench/gpu_check.py "${args[@]}"
