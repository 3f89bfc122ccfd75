#!/usr/bin/env bash
# Sixth session's merges on the H100. PART=pangu: the changed kernels' tests on CUDA, the new openPangu decode
# kernels against their PyTorch paths (bench/pangu_decode_kernels.py, bench/mla_decode.py), then openPangu-2.0-Flash
# decode (MTP, a 4096-token prompt, the MoE few-slot split A/B). PART=more: openPangu at a 32k capacity and its
# step profile, then Llama-3-8B, Gemma 4 31B and DeepSeek-V4-Flash decode. Results under $OUT; digest on stdout.
set -u
OUT=${OUT:-/tmp/out}
source bench/device_setup.sh
digest() { grep -E "$1" | cut -c1-220; }
if [ "${PART:-pangu}" = pangu ]; then
    timeout 170 python3 -m pytest -q -x tests/kernels -k "mla or norm or mome or moe or rope" 2>&1 | tail -3
    timeout 60 python3 bench/pangu_decode_kernels.py --out "$OUT" --batch 1,8 2>&1 | tail -12 | cut -c1-220
    timeout 90 python3 bench/mla_decode.py --out "$OUT" 2>&1 | digest "mla_decode:|Error"
    timeout 260 python3 bench/decode.py --arch openpangu_v2 --synthetic flash --bits 4 --head-bits 8 --batch 1,8 \
        --steps 32 --prefill-len 4096 --mtp 3 --forced-accept 0.9 --ab-tuning MOE_FEW_SLOTS=0 --out "$OUT" 2>&1 \
        | digest "decode|check:|prefill:|ab_tuning|Error"
else
    timeout 120 python3 bench/long_context.py --arch openpangu_v2 --synthetic flash --contexts 128,8192 \
        --out "$OUT" 2>&1 | digest "decode:|Error"
    timeout 100 python3 bench/profile_decode.py --arch openpangu_v2 --synthetic flash --bits 4 --head-bits 8 \
        --batch 1 --steps 4 --out "$OUT" 2>&1 | tail -4 | cut -c1-300
    timeout 80 python3 bench/decode.py --synthetic llama3-8b --bits 4 --batch 1,8 --steps 32 --prefill-len 512 \
        --out "$OUT" 2>&1 | digest "decode:|check:|prefill:|Error"
    timeout 110 python3 bench/decode.py --arch gemma4 --synthetic 31b --bits 4 --batch 1,8 --steps 32 --prefill-len 512 \
        --out "$OUT" 2>&1 | digest "decode:|check:|prefill:|Error"
    timeout 150 python3 bench/decode.py --arch deepseek_v4 --synthetic flash --bits 4 --expert-bits 2 --batch 1,8 \
        --prompt-len 128 --steps 32 --prefill-len 256 --ab-tuning MOE_FEW_SLOTS=0 --out "$OUT" 2>&1 \
        | digest "decode:|check:|ab_tuning|Error"
fi
