#!/usr/bin/env bash
# GPU session for the MLA decode kernels (issue 8): the kernels' interpreter tests on the GPU, then
# bench/mla_decode.py at openPangu-2.0-Flash shapes (check + CUDA-graph timings of the kernels and
# the PyTorch path at positions 200, 4k, 32k with 32768 tokens of capacity, and a launch-setting
# sweep), then the whole Flash model at batch 1 and 8 with --max-seq-len 32768.
set -u
source "$(dirname "$0")/device_setup.sh"
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1
timeout 150 python3 -m pytest -x -q tests/kernels/test_triton_mla.py 2>&1 | tail -5
timeout 360 python3 bench/mla_decode.py --sweep --out "$OUT" 2>&1 | grep -v Warning | tail -80
timeout 240 python3 bench/decode.py --arch openpangu_v2 --synthetic flash --bits 4 --head-bits 8 --batch 1,8 \
    --steps 32 --prefill-len 4096 --max-seq-len 32768 --out "$OUT" 2>&1 | grep -v Warning | tail -20
