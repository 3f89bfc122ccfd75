set -u
OUT=${OUT:-/tmp/out}
source bench/device_setup.sh
timeout 150 python3 -m pytest -q -x tests/kernels/test_triton_mla.py 2>&1 | tail -3
timeout 240 python3 bench/mla_decode.py --sweep --out "$OUT" 2>&1 | tail -40 | cut -c1-250
timeout 150 python3 bench/decode.py --arch openpangu_v2 --synthetic flash --bits 4 --head-bits 8 --batch 1,8 \
    --steps 32 --prefill-len 256 --out "$OUT" 2>&1 | grep -E "decode:|check:|Error" | cut -c1-200
timeout 120 python3 bench/kernels.py --out "$OUT" --budget 110 --sections gemv_variants \
    --variants "lanes ring3 early,lanes ring3 early r64" 2>&1 | grep -E "summary" | cut -c1-170
