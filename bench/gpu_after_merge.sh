#!/usr/bin/env bash
# After this session's merges (grouped projections, MoE ring loop and gate+up launch, MLA decode kernels, mHC
# site kernels, Gemma 4 fused norms): the new kernels' tests on CUDA, then openPangu-2.0-Flash decode (with MTP)
# and against a 32k capacity. PART=models instead: Llama-3-8B, Gemma 4 31B and DeepSeek-V4-Flash decode.
set -u
OUT=${OUT:-/tmp/out}
source bench/device_setup.sh
if [ "${PART:-pangu}" = pangu ]; then
    timeout 200 python3 -m pytest -q -x tests/kernels -k "mla or mhc or norm or act or rope or linear_group or moe or paged" \
        2>&1 | tail -3
    timeout 220 python3 bench/decode.py --arch openpangu_v2 --synthetic flash --bits 4 --head-bits 8 --batch 1,8 \
        --steps 32 --prefill-len 256 --mtp 3 --forced-accept 0.9 --out "$OUT" 2>&1 | grep -E "decode|check:|prefill:|Error" | cut -c1-220
    timeout 150 python3 bench/long_context.py --arch openpangu_v2 --synthetic flash --contexts 128,8192 \
        --out "$OUT" 2>&1 | grep -E "decode:|Error" | cut -c1-200
else
    timeout 80 python3 bench/decode.py --synthetic llama3-8b --bits 4 --batch 1,8 --steps 32 --prefill-len 512 \
        --out "$OUT" 2>&1 | grep -E "decode:|check:|prefill:|Error" | cut -c1-200
    timeout 120 python3 bench/decode.py --arch gemma4 --synthetic 31b --bits 4 --batch 1,8 --steps 32 --prefill-len 512 \
        --out "$OUT" 2>&1 | grep -E "decode:|check:|prefill:|Error" | cut -c1-200
    timeout 150 python3 bench/decode.py --arch deepseek_v4 --synthetic flash --bits 4 --expert-bits 2 --batch 1,8 \
        --prompt-len 128 --steps 32 --prefill-len 256 --out "$OUT" 2>&1 | grep -E "decode:|check:|Error" | cut -c1-200
    timeout 150 python3 bench/mla_decode.py --positions 200,4096,32767 --batch 1 --out "$OUT" 2>&1 | tail -12 | cut -c1-250
fi
