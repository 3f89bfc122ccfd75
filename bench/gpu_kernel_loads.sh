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
bash "$(dirname "$0")/gpu_decode_models.sh"
