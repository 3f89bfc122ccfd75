#!/usr/bin/env bash
# GPU session for the fused mHC sites (issue 8): the site kernels' tests on CUDA, then
# bench/mhc_sites.py (checked, then timed in CUDA graphs against today's PyTorch ops at openPangu-Flash
# and DeepSeek-V4 shapes), then openPangu-2.0-Flash decode at batch 1 and 8 (~47 tokens/s at batch 1
# before) and the kernels per eager decode step. Results under $OUT.
set -u
source "$(dirname "$0")/device_setup.sh"
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_triton_mhc.py tests/test_mhc.py 2>&1 | tail -3
timeout 200 python3 bench/mhc_sites.py --rows 1,8,64 --budget 170 --out "$OUT" 2>&1 | grep -E "layer_sites|check_failed|errors|results" | cut -c1-400
timeout 180 python3 bench/decode.py --arch openpangu_v2 --synthetic flash --bits 4 --head-bits 8 --batch 1,8 \
    --steps 32 --prefill-len 256 --out "$OUT" 2>&1 | grep -E "decode|check:" | cut -c1-220
