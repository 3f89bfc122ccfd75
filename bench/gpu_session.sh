#!/usr/bin/env bash
# One GPU session of the kernel work: kernel tests on CUDA, Nsight Compute on the
# two GEMM paths, then bench/kernels.py. Results and logs go to $OUT.
set -u
source "$(dirname "$0")/device_setup.sh"
OUT=${OUT:-/tmp/out}
SECTIONS=${SECTIONS:-env,exact,gemv,m16,table,crossover,moe}
BUDGET=${BUDGET:-300}
if [ "${RUN_TESTS:-1}" = 1 ]; then
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels ${TEST_FILTER:+-k "$TEST_FILTER"} 2>&1 | tail -3
fi
if [ "${RUN_NCU:-1}" = 1 ] && command -v ncu >/dev/null; then
    for spec in "1 1 2" "16 16 2"; do
        set -- $spec
        timeout 120 ncu --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
            --section MemoryWorkloadAnalysis -k regex:_exl3_gemm_kernel -s 2 -c 1 \
            python3 bench/profile_gemm.py --rows $1 --block-m $2 --btk $3 > "$OUT/ncu_rows$1.txt" 2>&1
        grep -E "Duration|Throughput|Registers|Achieved Occupancy|Issued Ipc|No Eligible|Stall|stall" "$OUT/ncu_rows$1.txt" | head -40
    done
fi
PYTHONUNBUFFERED=1 python3 bench/kernels.py --out "$OUT" --budget "$BUDGET" --sections "$SECTIONS" ${KERNELS_ARGS:-} 2>&1 | grep -v Warning | tail -70
