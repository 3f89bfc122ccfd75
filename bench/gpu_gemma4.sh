#!/usr/bin/env bash
# GPU session for the Gemma 4 adapter: the ring cache and kernels on a small synthetic Gemma 4
# (CUDA graphs, batch 4, sequence past the window), then the gemma-4-31B-shaped decode/prefill figures.
set -u
source "$(dirname "$0")/device_setup.sh"
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1
timeout 150 python3 bench/decode.py --arch gemma4 --synthetic tiny --batch 1,4 --steps 16 --prefill-len 512 \
    --out "$OUT" 2>&1 | grep -v Warning | tail -25
timeout 420 python3 bench/decode.py --arch gemma4 --synthetic 31b --bits 4 --batch 1,8 --steps 32 \
    --out "$OUT" 2>&1 | grep -v Warning | tail -30
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
