#!/usr/bin/env bash
# GPU session after making "lanes ring3 early" the one-row schedule: the kernel and encoder tests on CUDA,
# then whole-model decode (8B, Gemma 4 31B, openPangu-2.0-Flash with MTP 3 at 90% forced acceptance,
# DeepSeek-V4-Flash shapes; each checks cached decode against the plain forward).
set -u
source "$(dirname "$0")/device_setup.sh"
if ! python3 -m pytest --version >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/pyt .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/pyt"
fi
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_triton_kernels.py tests/kernels/test_triton_viterbi.py \
    -k "fused_gemm or dispatch or one_row or viterbi or whole_step or loop_form or encode_tiles" 2>&1 | tail -3
timeout 60 python3 bench/decode.py --synthetic llama3-8b --bits 4 --batch 1,8 --steps 32 --prefill-len 512 \
    --out "$OUT" 2>&1 | grep -E "decode:|check:" | cut -c1-200
timeout 90 python3 bench/decode.py --arch gemma4 --synthetic 31b --bits 4 --batch 1,8 --steps 32 --prefill-len 512 \
    --out "$OUT" 2>&1 | grep -E "decode:|check:" | cut -c1-200
timeout 200 python3 bench/decode.py --arch openpangu_v2 --synthetic flash --bits 4 --head-bits 8 --batch 1,8 \
    --steps 32 --prefill-len 256 --mtp 3 --forced-accept 0.9 --out "$OUT" 2>&1 | grep -E "decode|check:" | cut -c1-200
timeout 110 python3 bench/decode.py --arch deepseek_v4 --synthetic flash --bits 4 --expert-bits 2 --batch 1,8 --prompt-len 128 \
    --steps 32 --prefill-len 256 --out "$OUT" 2>&1 | grep -E "decode:|check:" | cut -c1-200
