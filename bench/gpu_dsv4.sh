#!/usr/bin/env bash
# GPU session for the DeepSeek-V4 adapter: the cached path and CUDA-graph decode on a small synthetic
# DeepSeek-V4 (all three layer kinds, indexer selective, sequence past window and ratio-128 windows),
# then the DeepSeek-V4-Flash-shaped decode figures (43 layers, 256 experts; experts at 2 bits like the
# ds4 recipe, the rest at 4, head at 6: about 75 GB of weights, so an 80 GB H100 holds it).
set -u
source "$(dirname "$0")/device_setup.sh"
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1
timeout 200 python3 bench/decode.py --arch deepseek_v4 --synthetic tiny --batch 1,4 --steps 16 --prefill-len 512 \
    --out "$OUT" 2>&1 | grep -v Warning | tail -25
timeout 560 python3 bench/decode.py --arch deepseek_v4 --synthetic flash --bits 4 --expert-bits 2 --batch 1,8 \
    --steps 32 --prompt-len 128 --prefill-len 1024 --out "$OUT" 2>&1 | grep -v Warning | tail -30
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
