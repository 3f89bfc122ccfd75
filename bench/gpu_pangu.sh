#!/usr/bin/env bash
# GPU session for the OpenPanguV2 adapter: first the small synthetic Pangu (every layer kind, CUDA
# graphs, sequence past the window and the indexer's top-k; its "check" record must show
# decode_vs_full_rel_err ~1e-3 or less in fp16), then openPangu-2.0-Flash shapes (4 bits, head 8 bits,
# ~51 GB): decode tokens/s at batch 1 and 8, time to first token for a 4k prompt, memory. In between,
# kernels per decode step of the small model (what decides the batch-1 speed inside a CUDA graph).
set -u
source "$(dirname "$0")/device_setup.sh"
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1
timeout 100 python3 bench/decode.py --arch openpangu_v2 --synthetic tiny --batch 1,4 --steps 16 --prefill-len 512 \
    --mtp 3 --forced-accept 0.9 --out "$OUT" 2>&1 | grep -v Warning | tail -25
timeout 80 python3 bench/profile_decode.py --arch openpangu_v2 --synthetic tiny --out "$OUT" 2>&1 \
    | grep -v Warning | tail -30
timeout 400 python3 bench/decode.py --arch openpangu_v2 --synthetic flash --bits 4 --head-bits 8 --batch 1,8 \
    --steps 32 --prefill-len 4096 --mtp 3 --forced-accept 0.9 --out "$OUT" 2>&1 | grep -v Warning | tail -30
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
