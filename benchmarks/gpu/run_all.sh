#!/usr/bin/env bash
# The prepared GPU check (issue: GPUs and beyond one machine): one call, <= 8 minutes on one GPU.
#   bash benchmarks/gpu/run_all.sh [OUT_DIR]
# Writes OUT_DIR/gpu_results.json (default: $OUT, else the current directory) and prints each section.
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${1:-${OUT:-.}}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
timeout 480 python benchmarks/gpu/run_all.py --device cuda --out "$out/gpu_results.json"
rc=$?
[ $rc -eq 124 ] && echo "run_all.py hit the 8-minute budget; the JSON holds the sections that finished"
exit $rc
