#!/usr/bin/env bash
# GPU session after making "lanes ring3 early" the one-row schedule: the kernel and encoder tests on CUDA,
# then whole-model decode (8B, Gemma 4 31B, openPangu-2.0-Flash with MTP 3 at 90% forced acceptance,
# DeepSeek-V4-Flash shapes; each checks cached decode against the plain forward).
set -u
source "$(dirname "$0")/device_setup.sh"
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_triton_kernels.py tests/kernels/test_triton_viterbi.py \
    -k "fused_gemm or dispatch or one_row or viterbi or whole_step or loop_form or encode_tiles" 2>&1 | tail -3
bash "$(dirname "$0")/gpu_decode_models.sh"
