#!/usr/bin/env bash
# Baselines for this session's work: one launch per projection group (bench/fused_projections.py) and
# decode against cache capacity / filled context (bench/long_context.py) for Llama-3-8B and openPangu-2.0-Flash.
set -u
OUT=${OUT:-/tmp/out}
source bench/device_setup.sh
timeout 150 python3 bench/fused_projections.py --out "$OUT" 2>&1 | grep -E "groups:|Error" | cut -c1-260
timeout 90 python3 bench/long_context.py --arch "" --synthetic llama3-8b --bits 4 --head-bits 6 --contexts 128,8192 \
    --out "$OUT" 2>&1 | grep -E "decode:|Error" | cut -c1-200
timeout 300 python3 bench/long_context.py --arch openpangu_v2 --synthetic flash --contexts 128,8192 \
    --out "$OUT" 2>&1 | grep -E "decode:|Error" | cut -c1-200
