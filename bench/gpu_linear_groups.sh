#!/usr/bin/env bash
# Linears sharing an input computed by one matmul (LinearGroup): the kernel tests on CUDA, separate vs
# concatenated launches per projection group (bench/fused_projections.py), then whole-model decode of the
# Llama-3-8B and Gemma 4 31B shapes (each run checks cached decode against the plain forward).
set -u
OUT=${OUT:-/tmp/out}
source bench/device_setup.sh
timeout 240 python3 -m pytest -q -x tests/kernels/test_linear_group.py tests/kernels/test_triton_kernels.py \
    -k "linear_group or fused_gemm or public_matmul" 2>&1 | tail -3
timeout 150 python3 bench/fused_projections.py --out "$OUT" 2>&1 | grep -E "groups:|Error" | cut -c1-230
timeout 80 python3 bench/decode.py --synthetic llama3-8b --bits 4 --batch 1,2,8 --steps 32 --prefill-len 512 \
    --out "$OUT" 2>&1 | grep -E "decode:|check:|prefill:|Error" | cut -c1-200
timeout 120 python3 bench/decode.py --arch gemma4 --synthetic 31b --bits 4 --batch 1,2,8 --steps 32 --prefill-len 512 \
    --out "$OUT" 2>&1 | grep -E "decode:|check:|prefill:|Error" | cut -c1-200
