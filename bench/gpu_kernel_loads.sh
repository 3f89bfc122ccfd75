#!/usr/bin/env bash
# GPU session for the latency fixes of the one-row and MoE-decode kernels (activations loaded two at a
# time; split-K partials and MoE slots summed by batched loads): kernel tests on CUDA, one-row schedules
# on many shapes, the issue's table, MoE decode, then whole-model decode of the 8B, Gemma 4 31B,
# openPangu-2.0-Flash (with MTP 3 at 90% forced acceptance) and DeepSeek-V4-Flash shapes.
set -u
source "$(dirname "$0")/device_setup.sh"
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1
RUN_NCU=0 TEST_FILTER="fused_gemm or moe or dispatch or split" SECTIONS=env,gemv_shapes,table,moe BUDGET=200 \
    bash "$(dirname "$0")/gpu_session.sh" > "$OUT/kernels.log" 2>&1
grep -E "passed|failed|table:" "$OUT/kernels.log" | cut -c1-200
timeout 60 python3 bench/decode.py --synthetic llama3-8b --bits 4 --batch 1,8 --steps 32 --prefill-len 512 \
    --out "$OUT" 2>&1 | grep -E "decode:|check:" | cut -c1-200
timeout 90 python3 bench/decode.py --arch gemma4 --synthetic 31b --bits 4 --batch 1,8 --steps 32 --prefill-len 512 \
    --out "$OUT" 2>&1 | grep -E "decode:|check:" | cut -c1-200
timeout 200 python3 bench/decode.py --arch openpangu_v2 --synthetic flash --bits 4 --head-bits 8 --batch 1,8 \
    --steps 32 --prefill-len 256 --mtp 3 --forced-accept 0.9 --out "$OUT" 2>&1 | grep -E "decode|check:" | cut -c1-200
timeout 110 python3 bench/decode.py --arch deepseek_v4 --synthetic flash --bits 4 --expert-bits 2 --batch 1,8 --prompt-len 128 \
    --steps 32 --prefill-len 256 --out "$OUT" 2>&1 | grep -E "decode:|check:" | cut -c1-200
