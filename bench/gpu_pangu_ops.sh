#!/usr/bin/env bash
# GPU session for the openPangu-2.0 decode-step op reduction (issue 8): the family's tests on CUDA, then
# openPangu-2.0-Flash shapes at batch 1 and 8 with and without 3 MTP tokens (90% forced acceptance), then
# the kernels per eager decode step and their time (to compare with the 7849 kernels / 25.6 ms before).
set -u
source "$(dirname "$0")/device_setup.sh"
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_openpangu_v2.py tests/kernels 2>&1 | tail -2
timeout 200 python3 bench/decode.py --arch openpangu_v2 --synthetic flash --bits 4 --head-bits 8 --batch 1,8 \
    --steps 32 --prefill-len 256 --mtp 3 --forced-accept 0.9 --out "$OUT" 2>&1 | grep -E "decode|check:" | cut -c1-220
timeout 150 python3 bench/profile_decode.py --arch openpangu_v2 --synthetic flash --bits 4 --head-bits 8 --batch 1 \
    --steps 4 --out "$OUT" 2>&1 | grep -v Warning | tail -25
