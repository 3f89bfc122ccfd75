#!/usr/bin/env bash
# GPU session for the one-row kernel variants (issue 3; docs/performance.md, "One-row kernel: load layout
# and bytes in flight"): the variants' kernel tests on CUDA, then bench/kernels.py's gemv_variants section
# (today's schedule vs each variant and their combinations on the issue's shapes, fp16 in the same run,
# then the K-split count of the fastest variant), rendered as a table. Results and logs go to $OUT.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
RUN_NCU=0 TEST_FILTER="prefetch_steps or async_stages or one_row or gemv_variants" SECTIONS=env,gemv_variants \
    BUDGET=${BUDGET:-420} bash "$(dirname "$0")/gpu_session.sh" > "$OUT/gemv_variants.log" 2>&1
grep -E "passed|failed|error|results:" "$OUT/gemv_variants.log" | cut -c1-300
for f in "$OUT"/kernels-*.json; do python3 "$(dirname "$0")/report.py" "$f"; done
# Optional (NCU=1): Nsight Compute on today's one-row schedule and on the async + lane-major variant, to read
# L1 wavefronts, long-scoreboard stalls and DRAM throughput directly (hypotheses (a) and (b)).
if [ "${NCU:-0}" = 1 ] && command -v ncu >/dev/null; then
    source "$(dirname "$0")/device_setup.sh" >/dev/null
    for variant in "" "--async-stages 4 --lane-major"; do
        name=$( [ -z "$variant" ] && echo today || echo async4-lanes )
        timeout 150 ncu --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis_Tables \
            --section Occupancy -k regex:_exl3_gemm_kernel -s 2 -c 1 python3 "$(dirname "$0")/profile_gemm.py" \
            --rows 1 --block-m 1 --btk 1 --warps 4 --rotate-in-kernel $variant > "$OUT/ncu_gemv_$name.txt" 2>&1
        grep -E "Duration|DRAM Throughput|L1/TEX Hit|Registers|Achieved Occupancy|Stall Long|Stall MIO|Wavefronts" \
            "$OUT/ncu_gemv_$name.txt" | head -20
    done
fi
