#!/usr/bin/env bash
# Eighth session, the tensor-core kernel's leaner main loop on the H100. PART=kernels: check + A/B against the
# seventh-session loop kept as kernels/gluon_gemv_prev.py when present (bench/gluon_variants.py), the kernel table
# against the Triton kernels and fp16 (bench/gluon_gemv.py), the CUDA kernel tests. PART=models: decode of Llama-3-8B,
# Gemma 4 31B and openPangu-2.0-Flash with the kernel on; PART=dsv4: DeepSeek-V4-Flash. Results under $OUT; digest on stdout.
set -u
OUT=${OUT:-/tmp/out}
source bench/device_setup.sh
digest() { grep -E "$1" | cut -c1-260; }
if [ "${PART:-kernels}" = kernels ]; then
    base=""; [ -f kernels/gluon_gemv_prev.py ] && base="--baseline exl3_triton.kernels.gluon_gemv_prev"
    timeout 280 python3 bench/gluon_variants.py --out "$OUT" $base --set FINISH_PAIRS=8 --tag final \
        --shapes 8192x8192x4,5376x21504x4,21504x5376x4,8192x8192x2,14336x4096x4,4096x14336x4 2>&1 \
        | digest "check: [0-9]|variants:|Error|rror"
    timeout 200 python3 bench/gluon_gemv.py --out "$OUT" 2>&1 | digest "mma_ready|check: [0-9]|time:|Error|rror"
    timeout 100 python3 -m pytest -q -x tests/kernels/test_gluon_gemv.py 2>&1 | tail -2
    timeout 100 python3 -m pytest -q -x tests/kernels -k "gemm or matmul or linear" 2>&1 | tail -2
elif [ "$PART" = dsv4 ]; then
    timeout 560 python3 bench/decode.py --arch deepseek_v4 --synthetic flash --bits 4 --expert-bits 2 --batch 1,8 \
        --steps 32 --prompt-len 128 --prefill-len 1024 --out "$OUT" 2>&1 | digest "decode|check:|Error"
else
    run() { timeout "$1" python3 bench/decode.py "${@:2}" --out "$OUT" 2>&1 | digest "decode|check:|Error"; }
    run 90 --synthetic llama3-8b --bits 4 --batch 1,8 --steps 32 --prefill-len 512
    run 150 --arch gemma4 --synthetic 31b --bits 4 --batch 1,8 --steps 32 --prefill-len 512
    run 200 --arch openpangu_v2 --synthetic flash --bits 4 --head-bits 8 --batch 1,8 --steps 32 --mtp 3 \
        --forced-accept 0.9
fi
