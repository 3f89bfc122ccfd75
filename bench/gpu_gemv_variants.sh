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
