#!/usr/bin/env bash
# Whole-model decode on synthetic weights of the real shapes: Llama-3-8B, Gemma 4 31B, openPangu-2.0-Flash
# (with MTP 3 at 90% forced acceptance) and DeepSeek-V4-Flash (experts at 2 bits), batch 1 and 8; each run
# checks cached decode against the plain forward. Called by the session scripts after device_setup.sh.
OUT=${OUT:-/tmp/out}
timeout 60 python3 bench/decode.py --synthetic llama3-8b --bits 4 --batch 1,8 --steps 32 --prefill-len 512 \
    --out "$OUT" 2>&1 | grep -E "decode:|check:" | cut -c1-200
timeout 90 python3 bench/decode.py --arch gemma4 --synthetic 31b --bits 4 --batch 1,8 --steps 32 --prefill-len 512 \
    --out "$OUT" 2>&1 | grep -E "decode:|check:" | cut -c1-200
timeout 200 python3 bench/decode.py --arch openpangu_v2 --synthetic flash --bits 4 --head-bits 8 --batch 1,8 \
    --steps 32 --prefill-len 256 --mtp 3 --forced-accept 0.9 --out "$OUT" 2>&1 | grep -E "decode|check:" | cut -c1-200
timeout 110 python3 bench/decode.py --arch deepseek_v4 --synthetic flash --bits 4 --expert-bits 2 --batch 1,8 --prompt-len 128 \
    --steps 32 --prefill-len 256 --out "$OUT" 2>&1 | grep -E "decode:|check:" | cut -c1-200
