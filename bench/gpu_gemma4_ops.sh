#!/usr/bin/env bash
# GPU session for the Gemma 4 decode-step op reduction (issue 6): the new kernels' tests on CUDA, the small
# synthetic Gemma 4 (CUDA graphs, batch 4, ring past the window) as a correctness check, the gemma-4-31B-shaped
# decode figures at batch 1 and 8, then the kernels per eager decode step and their time.
set -u
source "$(dirname "$0")/device_setup.sh"
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1
# the fused kernels on CUDA: against their references, and the whole decode path against the golden logits
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gemma4_fused.py tests/kernels/test_triton_norm.py \
    tests/kernels/test_triton_act.py tests/kernels/test_rope.py 2>&1 | tail -3
timeout 150 python3 bench/decode.py --arch gemma4 --synthetic tiny --batch 1,4 --steps 16 --prefill-len 512 \
    --out "$OUT" 2>&1 | grep -E "decode|check" | cut -c1-240
timeout 300 python3 bench/decode.py --arch gemma4 --synthetic 31b --bits 4 --batch 1,8 --steps 32 \
    --out "$OUT" 2>&1 | grep -E "model|decode|check|prefill" | cut -c1-240
timeout 150 python3 bench/profile_decode.py --arch gemma4 --synthetic 31b --bits 4 --batch 1 --steps 4 \
    --out "$OUT" 2>&1 | grep -v Warning | tail -25
