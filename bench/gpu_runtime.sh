#!/usr/bin/env bash
# GPU session for the runtime and speculative decoding: greedy equality of drafted decoding through
# CUDA-graph verification steps, then a kernel-time profile of eager decode steps.
set -u
source "$(dirname "$0")/device_setup.sh"
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1
timeout 150 python3 bench/spec_check.py --out "$OUT" 2>&1 | grep -v Warning | tail -12
timeout 200 python3 bench/profile_decode.py --synthetic ${PROFILE_MODEL:-llama3-8b} --batch 1 --steps 6 --out "$OUT" \
    2>&1 | grep -v Warning | tail -50
