#!/usr/bin/env bash
# Nsight Compute, full set, on the one-row default (lanes ring3 early, btk 1, 4 warps, rotation in the kernel):
# 8192x8192 at 4 and 2 bits and 4096x1024 at 4 bits (where the fixed cost per call dominates). Text reports
# under $OUT; a digest of pipe utilisation, issue and stall lines on stdout.
set -u
OUT=${OUT:-/tmp/out}
source bench/device_setup.sh
command -v ncu || { echo "no ncu"; exit 1; }
ONE_ROW="--rows 1 --block-m 1 --btk 1 --warps 4 --rotate-in-kernel --prefetch-steps 3 --lane-major --early-load"
for spec in "8192 8192 4" "8192 8192 2" "4096 1024 4"; do
    set -- $spec
    f="$OUT/ncu-gemv-$1x$2-k$3.txt"
    timeout 150 ncu --set full --import-source no -k regex:_exl3_gemm_kernel -s 2 -c 1 \
        python3 bench/profile_gemm.py --k $1 --n $2 --bits $3 $ONE_ROW > "$f" 2>&1
    echo "== $1x$2 K$3"
    grep -E "Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Issued Warp|No Eligible|Eligible Warps|Active Warps Per|Warp Cycles Per Issued|DRAM Throughput|L1/TEX Cache Throughput|Compute \(SM\)|Executed Ipc|Block Limit|Stall|pipe|Pipe|Executed Instructions  |Grid Size|Waves" "$f" | head -60
done
