#!/usr/bin/env bash
# After the dispatch rules (one row of a small weight stays on the Triton kernel; at most 32 K slices): the model
# shapes (bench/gluon_gemv.py --shapes models), the kernel's CUDA tests, Llama-3-8B and Gemma 4 31B decode.
set -u
OUT=${OUT:-/tmp/out}
source bench/device_setup.sh
digest() { grep -E "$1" | cut -c1-240; }
timeout 150 python3 bench/gluon_gemv.py --shapes models --out "$OUT" 2>&1 | digest "mma_ready|check: [0-9]|time:|Error"
timeout 120 python3 -m pytest -q tests/kernels/test_gluon_gemv.py 2>&1 | tail -2
timeout 80 python3 bench/decode.py --synthetic llama3-8b --bits 4 --batch 1,8 --steps 32 --prefill-len 512 \
    --out "$OUT" 2>&1 | digest "decode:|check:|prefill:|Error"
timeout 120 python3 bench/decode.py --arch gemma4 --synthetic 31b --bits 4 --batch 1,8 --steps 32 --prefill-len 512 \
    --out "$OUT" 2>&1 | digest "decode:|check:|prefill:|Error"
