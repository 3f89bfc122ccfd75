#!/usr/bin/env bash
# Sixth session's merges on the H100: the changed kernels' tests on CUDA, openPangu-2.0-Flash decode (MTP, a
# 4096-token prompt, the MoE few-slot split A/B, a 32k capacity), then PART=models: Llama-3-8B, Gemma 4 31B and
# DeepSeek-V4-Flash decode. Results under $OUT; digest on stdout.
set -u
OUT=${OUT:-/tmp/out}
source bench/device_setup.sh
if [ "${PART:-pangu}" = pangu ]; then
    timeout 200 python3 -m pytest -q -x tests/kernels -k "mla or norm or mome or moe or rope" 2>&1 | tail -3
    timeout 280 python3 bench/decode.py --arch openpangu_v2 --synthetic flash --bits 4 --head-bits 8 --batch 1,8 \
        --steps 32 --prefill-len 4096 --mtp 3 --forced-accept 0.9 --ab-tuning MOE_FEW_SLOTS=0 --out "$OUT" 2>&1 \
        | grep -E "decode|check:|prefill:|ab_tuning|Error" | cut -c1-220
    timeout 150 python3 bench/long_context.py --arch openpangu_v2 --synthetic flash --contexts 128,8192 \
        --out "$OUT" 2>&1 | grep -E "decode:|Error" | cut -c1-200
else
    timeout 80 python3 bench/decode.py --synthetic llama3-8b --bits 4 --batch 1,8 --steps 32 --prefill-len 512 \
        --out "$OUT" 2>&1 | grep -E "decode:|check:|prefill:|Error" | cut -c1-200
    timeout 120 python3 bench/decode.py --arch gemma4 --synthetic 31b --bits 4 --batch 1,8 --steps 32 --prefill-len 512 \
        --out "$OUT" 2>&1 | grep -E "decode:|check:|prefill:|Error" | cut -c1-200
    timeout 200 python3 bench/decode.py --arch deepseek_v4 --synthetic flash --bits 4 --expert-bits 2 --batch 1,8 \
        --prompt-len 128 --steps 32 --prefill-len 256 --ab-tuning MOE_FEW_SLOTS=0 --out "$OUT" 2>&1 \
        | grep -E "decode:|check:|ab_tuning|Error" | cut -c1-200
fi
