#!/usr/bin/env bash
# Programmatic dependent launch (kernels/launch.py): the EXL3 GEMM and MoE decode kernels' CUDA tests with it on,
# then whole-model decode with it off and on, alternating (bench/decode.py --pdl-ab), and the kernel table
# (graph times of back-to-back calls) both ways.
set -u
OUT=${OUT:-/tmp/out}
source bench/device_setup.sh
timeout 150 python3 -m pytest -q -x tests/kernels -k "gemm or moe or linear_group or gemv" 2>&1 | tail -3
timeout 120 python3 bench/decode.py --synthetic llama3-8b --bits 4 --batch 1,8 --steps 32 --prefill-len 512 --pdl-ab \
    --out "$OUT" 2>&1 | grep -E "pdl_ab|decode:|check:|Error" | cut -c1-200
timeout 200 python3 bench/decode.py --arch openpangu_v2 --synthetic flash --bits 4 --head-bits 8 --batch 1 \
    --steps 32 --prefill-len 256 --pdl-ab --out "$OUT" 2>&1 | grep -E "pdl_ab|decode:|check:|Error" | cut -c1-200
for pdl in 0 1; do
    EXL3_TRITON_PDL=$pdl timeout 100 python3 bench/kernels.py --out "$OUT" --budget 80 --sections env,table \
        2>&1 | tail -8 | cut -c1-200
    for f in "$OUT"/kernels-*.json; do
        case "$f" in *-pdl?.json) ;; *) mv "$f" "${f%.json}-pdl$pdl.json" ;; esac
    done
done
