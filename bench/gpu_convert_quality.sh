#!/usr/bin/env bash
# GPU session for the converter with the Triton tile encoder: its tests on CUDA, the quality comparison
# with the reference converter on the golden Llama (all four configurations; the golden files travel with
# the run, EXL3_TRITON_GOLDEN points at them), then one 8192 x 8192 linear at 4 bits.
set -u
source "$(dirname "$0")/device_setup.sh"
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_triton_viterbi.py 2>&1 | tail -2
EXL3_TRITON_GOLDEN=$PWD/.golden timeout 300 python3 bench/convert_quality.py --device cuda \
    --out "$OUT/convert-quality.json" 2>&1 | grep -v -i "warn\|progress\|%" | tail -12
timeout 150 python3 bench/convert.py --size 8192 --bits 4 --codebook mcg --device cuda --encoder-tiles 4096 \
    --check-bits "" --out "$OUT/convert-8192.json" 2>&1 | grep -E "quantize_linear_s|encoder_tiles|stage|ldlq|weight_ref|search|relative"
