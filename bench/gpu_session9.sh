#!/usr/bin/env bash
# Ninth session on the H100. PART=reconstruct: check + schedule sweep + large-batch matmuls of the full-weight
# reconstruction (bench/reconstruct.py). PART=models: Llama-3-8B prefill of 2048 tokens with the reconstruct path
# against the dequant path (alternating), and the tensor-core kernel at 12 and 16 rows on the model shapes.
# Results under $OUT; digest on stdout.
set -u
OUT=${OUT:-/tmp/out}
source bench/device_setup.sh
digest() { grep -E "$1" | cut -c1-300; }
if [ "${PART:-reconstruct}" = reconstruct ]; then
    timeout "${LIMIT:-420}" python3 bench/reconstruct.py --out "$OUT" --budget "${BUDGET:-360}" 2>&1 \
        | digest "check|sweep|weight_pass|matmul:|parts|Error|rror"
else
    timeout 220 python3 bench/decode.py --synthetic llama3-8b --bits 4 --batch 1 --steps 8 --prefill-len 2048 \
        --prefill-ab-tuning RECONSTRUCT_MIN_ROWS=1000000000 --out "$OUT" 2>&1 | digest "prefill|check:|Error|rror"
    timeout 200 python3 bench/gluon_gemv.py --out "$OUT" --shapes models --rows 12,16 --no-check 2>&1 \
        | digest "time:|Error|rror"
fi
