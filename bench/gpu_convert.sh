#!/usr/bin/env bash
# GPU session for the converter's Triton tile encoder: schedule sweep, check against the PyTorch encoder at
# every rate and codebook, then an 8192 x 8192 linear at 4 bits (MCG) with the Triton encoder.
set -u
source "$(dirname "$0")/device_setup.sh"
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1
timeout 500 python3 bench/convert.py --size 8192 --bits 4 --codebook mcg --device cuda --encoder-tiles ${TILES:-2048} ${EXTRA:-} \
    --sweep ${SWEEP:-4x2048,4x4096,2x1024,2x2048,8x4096} --out "$OUT/convert-8192.json" 2>&1 | tail -40
