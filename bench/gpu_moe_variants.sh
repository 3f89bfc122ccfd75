#!/usr/bin/env bash
# GPU session for the MoE decode schedules (issues 3 and 8; kernels/triton_moe.py MoeDecodeConfig): the MoE
# kernel tests on CUDA, then bench/kernels.py's moe_variants section (the previous one-row loop against the
# ring loop and its switches, at openPangu-2.0-Flash and DeepSeek-V4 expert shapes, 8 of 256 experts, 1/4/8
# tokens, 4 then 2 bits, each checked against the reference with poisoned outputs, timed in CUDA graphs),
# rendered as a table. Results and logs go to $OUT.
#   MOE_BITS=2 RUN_TESTS=0 bash bench/gpu_moe_variants.sh   # a second call for what the budget left out
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
RUN_NCU=0 TEST_FILTER="moe" SECTIONS=env,moe_variants BUDGET=${BUDGET:-360} KERNELS_ARGS="--moe-bits ${MOE_BITS:-4,2}" \
    bash "$(dirname "$0")/gpu_session.sh" > "$OUT/moe_variants.log" 2>&1
grep -E "passed|failed|error|results:" "$OUT/moe_variants.log" | cut -c1-300
for f in "$OUT"/kernels-*.json; do python3 "$(dirname "$0")/report.py" "$f"; done
