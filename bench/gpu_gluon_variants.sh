#!/usr/bin/env bash
# The tensor-core kernel's variants on the GPU: check + A/B timing (bench/gluon_variants.py), then Nsight Compute
# on one call of the current kernel (8192x8192, 4 bits, one row). Results under $OUT.
set -u
OUT=${OUT:-/tmp/out}
source bench/device_setup.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
python3 bench/gluon_variants.py --out "$OUT" ${BASELINE:+--baseline $BASELINE} ${VARIANT_ARGS:-} 2>&1 | tail -40
if [ "${NCU:-1}" = 1 ] && command -v ncu >/dev/null; then
    cat > /tmp/ncu_one.py <<'PY'
import sys, torch
sys.path.insert(0, "bench")
from common import synthetic_exl3
from exl3_triton.kernels import Codebook
from exl3_triton.kernels.gluon_gemv import exl3_gemm_mma
k, n, bits, rows = (int(v) for v in sys.argv[1:5])
w = synthetic_exl3(k, n, bits, Codebook.MCG, device="cuda")
x = torch.randn(rows, k, device="cuda").half()
for _ in range(3):
    exl3_gemm_mma(x, w)
torch.cuda.synchronize()
PY
    for spec in "8192 8192 4 1" "8192 8192 2 1"; do
        set -- $spec
        f="$OUT/ncu-gluon-$1x$2-k$3-r$4"
        timeout 150 ncu --set full --import-source no -k regex:_mma_gemm_kernel -s 2 -c 1 -o "$f" \
            python3 /tmp/ncu_one.py $1 $2 $3 $4 > "$f.log" 2>&1
        ncu --import "$f.ncu-rep" --page details > "$f.txt" 2>&1
        ncu --import "$f.ncu-rep" --page raw --csv > "$f-raw.csv" 2>&1
        echo "== ncu $1x$2 K$3 rows $4"
        grep -E "Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Issued Warp|No Eligible|Eligible Warps|Active Warps Per|Warp Cycles Per Issued|DRAM Throughput|Compute \(SM\)|Executed Ipc|Executed Instructions  |Grid Size|Waves|SM Frequency" "$f.txt" | head -30
        python3 - "$f-raw.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
head, units, vals = rows[0], rows[1], rows[2]
for h, v in zip(head, vals):
    if "issue_stalled" in h and "per_warp_active" in h and h.endswith(".pct"):
        try:
            if float(v) >= 2: print(f"{h}: {v}")
        except ValueError: pass
PY
    done
fi
