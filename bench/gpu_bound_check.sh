#!/usr/bin/env bash
# openPangu-2.0-Flash: cached decode against the full forward where the DSA context bound matters (eager and CUDA
# graphs): decoding positions 1176-1199 (below the indexer's top_k, the layers skip the selection), 2040-2063
# (across it: a new graph past the bound) and 4136-4159 (past it).
set -u
OUT=${OUT:-/tmp/out}
source bench/device_setup.sh
timeout 400 python3 bench/decode.py --arch openpangu_v2 --synthetic flash --bits 4 --head-bits 8 --batch 1 \
    --steps 16 --prefill-len 256 --check-tokens 1200 --check-tokens 2064 --check-tokens 4160 --out "$OUT" 2>&1 \
    | grep -E "check:|decode:|Error" | cut -c1-220
