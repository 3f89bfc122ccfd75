#!/usr/bin/env bash
# The Gluon tensor-core few-row kernel on the H100. PART=kernels: its check over every format and the table's
# shapes at 1-8 rows against the Triton kernels and fp16, and its K split (bench/gluon_gemv.py), the CUDA kernel
# tests, then Llama-3-8B decode with the kernel on and off (EXL3_TRITON_MMA=0: two processes). PART=models: the
# model shapes, Gemma 4 31B and openPangu-2.0-Flash decode, on and off. Results under $OUT; digest on stdout.
set -u
OUT=${OUT:-/tmp/out}
source bench/device_setup.sh
digest() { grep -E "$1" | cut -c1-240; }
onoff() {  # the same decode command with the kernel on, then off (results files tagged -mma / -nomma)
    for mma in 1 0; do
        mkdir -p "$OUT/mma$mma"
        EXL3_TRITON_MMA=$mma timeout "$1" python3 bench/decode.py "${@:2}" --out "$OUT/mma$mma" 2>&1 \
            | digest "decode|check:|Error" | sed "s/^/mma=$mma /"
    done
}
if [ "${PART:-kernels}" = kernels ]; then
    timeout 240 python3 bench/gluon_gemv.py --out "$OUT" 2>&1 | digest "mma_ready|check: [0-9]|time:|splits:|Error|rror"
    timeout 100 python3 -m pytest -q -x tests/kernels -k "gemm or matmul or linear" 2>&1 | tail -2
    onoff 90 --synthetic llama3-8b --bits 4 --batch 1,8 --steps 32 --prefill-len 512
else
    timeout 150 python3 bench/gluon_gemv.py --shapes models --out "$OUT" 2>&1 | digest "mma_ready|check: [0-9]|time:|Error"
    onoff 150 --arch gemma4 --synthetic 31b --bits 4 --batch 1,8 --steps 32 --prefill-len 512
    onoff 200 --arch openpangu_v2 --synthetic flash --bits 4 --head-bits 8 --batch 1,8 --steps 32 --mtp 3 \
        --forced-accept 0.9
fi
