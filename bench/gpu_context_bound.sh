#!/usr/bin/env bash
# openPangu-2.0-Flash with the DSA layers' context bound (no index scores / top-k below the indexer's top_k):
# the MLA kernel tests on CUDA, decode (its 4160-token check crosses the bound in eager mode and in graphs) with
# MTP, at the bench's capacity (what the run needs) and at the generator's default 8192, then 32k capacity at 128 / 8192 tokens.
set -u
OUT=${OUT:-/tmp/out}
source bench/device_setup.sh
timeout 100 python3 -m pytest -q -x tests/kernels/test_triton_mla.py 2>&1 | tail -2
for cap in default 8192; do
    mkdir -p "$OUT/cap-$cap"
    timeout 200 python3 bench/decode.py --arch openpangu_v2 --synthetic flash --bits 4 --head-bits 8 --batch 1,8 \
        --steps 32 --prefill-len 256 --mtp 3 --forced-accept 0.9 $([ $cap = default ] || echo --max-seq-len $cap) \
        --out "$OUT/cap-$cap" 2>&1 | grep -E "decode|check:|Error" | cut -c1-200
done
timeout 120 python3 bench/long_context.py --arch openpangu_v2 --synthetic flash --contexts 128,8192 \
    --out "$OUT" 2>&1 | grep -E "decode:|Error" | cut -c1-200
