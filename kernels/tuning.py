"""Kernel schedules and crossovers, measured on the GPU by ``bench/kernels.py``.

The figures behind each choice (H100 80GB HBM3, Triton 3.6, 2026-11-22) are in
``docs/performance.md``; rerun the bench on new hardware and update these.
"""

from __future__ import annotations

import functools

# Above this many rows an EXL3 matmul dequantizes W_hat and calls torch.matmul
# (crossover section: the fused kernel re-decodes the weight for every block of
# rows, the dequantize path decodes it once).
FUSED_MAX_ROWS = 32

# From this many rows an EXL3 matmul reconstructs the whole weight W (rotations folded in, kernels/
# triton_reconstruct.py) and calls torch.matmul with x as it is, instead of rotating x and the result around a
# W_hat product: the two activation rotations grow with the rows, the reconstruction does not. Measured in CUDA
# graphs on the H100 (bench/reconstruct.py, bench/results/reconstruct-2026-11-23-H100-*.json), 8192x8192 4 bits,
# reconstruct / dequant us: 1024 rows 289-303 / 273-279 (dequant ahead), 2048 rows 478-484 / 496-501; at 2048 rows
# on the model shapes 5376x21504 838 / 841, 21504x5376 867 / 879, 4096x14336 431 / 446, 14336x4096 414 / 441.
RECONSTRUCT_MIN_ROWS = 2048


# In CUDA graphs, one-row matmuls rotate x in the kernel (one launch) instead of in a
# separate launch: measured on a whole 8B model, 145 vs 136 tokens/s at batch 1
# (bench/decode.py, graph_rotation_choice; docs/performance.md).
GRAPH_ROTATE_IN_KERNEL = True


# 1-16 rows on CUDA: the Gluon tensor-core kernel (kernels/gluon_gemv.py), which feeds the decoded codebook words
# to mma straight from registers: ~4.5 instructions per weight in its main loop (4 bits) instead of ~11. Measured in
# CUDA graphs on the H100 (bench/gluon_gemv.py, docs/performance.md "Tensor cores from registers"). False (or
# EXL3_TRITON_MMA=0 in the environment) keeps the Triton kernels; a device whose first check fails keeps them too.
TENSOR_CORE_FEW_ROWS = True
# ... up to this many rows (the kernel takes 16: two 8-row halves of its B operand past 8), where 9-16 rows need a
# weight of at least TENSOR_CORE_MANY_ROWS_MIN_WEIGHT elements: 16 rows, graph us, tensor cores / Triton
# (bench/gluon_gemv.py, H100, eighth session, with the 16-row register cap of 136): 8192x8192 43.0 / 50.7,
# 5376x21504 56.3 / 74.9, 21504x5376 65.6 / 78.8, but 4096x4096 26.4 / 26.4 (at a cap of 128: 30.6 / 26.0, and
# 12 rows 28.5 / 26.0).
TENSOR_CORE_MAX_ROWS = 16
# Ninth session, the model shapes at 12 / 16 rows, tensor cores / Triton (bench/gluon_gemv.py --shapes models --rows
# 12,16, bench/results/gluon-gemv-models-2026-11-23-H100-rows12-16.json): 4096x14336 39.9 / 46.1, 42.9 / 45.2;
# 14336x4096 43.8 / 47.9, 44.6 / 46.8; but 5376x8192 (44M elements) 38.6 / 37.7, 40.9 / 37.8, and every smaller
# shape (4096x6144, 2560x7680, 2560x1536, 4096x1024) ties or loses: hence 48M, not the eighth session's 32M.
TENSOR_CORE_MANY_ROWS_MIN_WEIGHT = 48 << 20
# ... except one row of a small weight, where the Triton one-row kernel's single program wave is as quick or quicker
# (eighth session, after the kernel's leaner loop: 4096x1024 8.39 vs 8.39 us, 2560x1536 8.21 vs 8.25; 4096x4096
# 13.2 vs 18.8 the other way). The seventh session's rule for narrow, deep weights (out <= 4096, in >= 3x out) is
# gone: 14336x4096 now takes 26.1 us on the tensor cores against 31.9 on the Triton kernel.
TENSOR_CORE_ONE_ROW_MIN_WEIGHT = 8 << 20


# 3-4 rows (a step verifying 2-3 drafted tokens) of a small weight: blocks of 4 rows instead of 16.
# Measured in CUDA graphs (bench/verify_rows.py, H100, bench/results/verify-rows-2026-11-22-H100.json):
# 2560x2560 4 rows 20.2 vs 26.7 us, 2560x7680 32.0 vs 34.8 us; but 8192x8192 73.1 vs 69.6 us and
# 5376x21504 116.7 vs 105.5 us, so large weights keep the 16-row blocks. These 4-row blocks rotate x
# in the kernel (one launch instead of two): openPangu-2.0-Flash's MTP step (4 rows) 36.2 -> 35.4 ms
# (bench/decode.py --mtp 3, bench/results/decode-openpangu-flash-2026-11-22-H100-mtp160-rot4.json).
SMALL_WEIGHT = 2560 * 7680


# One row: the ring loop with three steps of trellis words in flight, warps reading one tile's
# contiguous words per load, first loads issued before the in-kernel rotation ("lanes ring3 early").
# Measured in CUDA graphs against the previous loop (one step ahead) on the H100
# (bench/gpu_gemv_variants.sh, bench/results/kernels-2026-11-22-H100-gemv-variants.json), us:
# 8192x8192 38.2 -> 36.9, 5376x21504 58.7 -> 58.1, 21504x5376 60.0 -> 56.4, 4096x4096 19.2 -> 18.5,
# 4096x14336 33.1 -> 32.0, 4096x1024 9.8 -> 8.3, 8192x8192 at 2 bits 45.5 -> 36.9; never slower.
ONE_ROW_LOOP = dict(prefetch_steps=3, lane_major=True)

# Several rows: the same one-tile-per-warp word loads in the main loop (``lane_major``), measured in
# CUDA graphs on the H100 (bench/kernels.py --sections dot_lanes,
# bench/results/kernels-2026-11-22-H100-dot-lanes-2.json), us, default load layout -> lane-major:
# 16 rows (tensor cores): 8192x8192 69.9 -> 50.5, 5376x21504 105.7 -> 75.4, 21504x5376 107.2 -> 79.4,
# 4096x14336 59.5 -> 45.1, 4096x4096 31.8 -> 26.2; 32 rows: 117.1 -> 97.2, 174.1 -> 120.5, 188.1 -> 157.6,
# 109.7 -> 92.2, 52.9 -> 49.0; 4 rows (FMAs): 1-2.5% faster at each shape; 2 rows: -3% to +2%, left off.


# 2 rows (a step verifying one drafted token, batch 2) of a large weight: a 16-row tensor-core block
# with lane-major loads instead of the 2-row FMA loop. Measured in CUDA graphs on the H100
# (bench/kernels.py --sections two_rows, bench/results/kernels-2026-11-22-H100-two-rows.json), us, FMA ->
# tensor cores: 8192x8192 56.7 -> 50.0, 5376x21504 90.5 -> 74.8, 21504x5376 96.5 -> 79.6, 4096x14336
# 54.2 -> 44.4; but 4096x4096 22.2 -> 25.9, 2560x7680 24.5 -> 27.1, 2560x2560 15.9 -> 24.1.
TWO_ROWS_TENSOR_CORES = 4096 * 14336


# MoE decode (kernels/triton_moe.py, few tokens: one program per column block, slot and K slice): the dense
# one-row kernel's ring loop ("lanes ring3 early"). Measured in CUDA graphs against the previous loop
# (decode_matmul, btk 2, 8 warps), 8 of 256 experts, 4 bits (bash bench/gpu_moe_variants.sh,
# bench/results/kernels-2026-11-23-H100-moe-variants.json), us, 1 / 4 / 8 tokens: openPangu gate/up 2560x1024
# 34.6 -> 23.3 / 67.4 -> 46.5 / 117.7 -> 81.5; openPangu down 1024x2560 (weighted sum) 45.6 -> 25.6 / 75.7 ->
# 49.1 / 129.1 -> 83.2; DeepSeek-V4 gate/up 4096x2048 48.5 -> 37.4 / 166.1 -> 115.8 / 342.5 -> 229.3; down
# 59.8 -> 40.6 / 179.5 -> 120.2 / 348.6 -> 228.3; the same at 2 bits. Forcing 4 K slices was faster still at
# one token (19.9 / 21.1 us on openPangu) but slower at 8 (99 vs 83): left to the automatic split.
MOE_DECODE = dict(btk=1, num_warps=4, early_load=True, **ONE_ROW_LOOP)

# Up to this many slots (one token's experts; 16 for its gate + up stacked in one launch), the MoE decode aims
# for this many K slices per slot instead of the programs-per-SM rule, which splits short slices 8-20 ways:
# fewer, longer programs and a shorter reduction. Measured at one token in the table above: openPangu gate/up
# 23.3 -> 19.9 us, down 25.6 -> 21.1, DeepSeek-V4 gate/up 37.4 -> 36.5 ("ring3 early sk4"); at 4-8 tokens it
# loses, hence the bound. (0 turns the rule off; bench/decode.py --ab-tuning MOE_FEW_SLOTS=0 compares.)
MOE_FEW_SLOTS = 16
MOE_FEW_SLOTS_SPLIT = 4

# Up to this many slots (tokens x selected experts) a MoE projection takes the decode schedule (one row per
# slot, FMAs); above, the grouped one (slots sorted by expert, tensor-core blocks).
MOE_DECODE_MAX_SLOTS = 64


@functools.lru_cache(maxsize=None)
def moe_decode_config(in_features: int, out_features: int, slots: int = MOE_DECODE_MAX_SLOTS):
    """The MoE decode schedule (``triton_moe.MoeDecodeConfig``) for experts of this shape and ``slots``
    (tokens x experts per token) in the launch."""
    from . import triton_ops

    few = dict(split_k=MOE_FEW_SLOTS_SPLIT) if slots <= MOE_FEW_SLOTS else {}
    return triton_ops.load().moe.MoeDecodeConfig(**{**MOE_DECODE, **few})


def fused_max_rows(in_features: int, out_features: int) -> int:
    return FUSED_MAX_ROWS



@functools.lru_cache(maxsize=None)
def gemm_config(rows: int, in_features: int, out_features: int, capturing: bool = False):
    """The fused kernel's schedule for ``rows`` input rows.

    ``capturing``: the call is being recorded into a CUDA graph, where a second
    launch costs little, so one row uses the separate rotation launch (fastest
    kernel); eager calls rotate inside the kernel (one launch, less host time).
    """
    from . import triton_ops

    GemmConfig = triton_ops.load().gemm.GemmConfig  # the Triton modules load on first use
    if rows == 1:
        if capturing and not GRAPH_ROTATE_IN_KERNEL:
            return GemmConfig(block_m=1, btk=2, num_warps=8)
        return GemmConfig(block_m=1, btk=1, num_warps=4, rotate_in_kernel=True, early_load=True, **ONE_ROW_LOOP)
    if rows == 2:
        if in_features * out_features >= TWO_ROWS_TENSOR_CORES:
            return GemmConfig(block_m=16, btk=2, num_warps=4, lane_major=True)
        return GemmConfig(block_m=2, btk=1, num_warps=4)
    if rows <= 4 and in_features * out_features <= SMALL_WEIGHT:
        return GemmConfig(block_m=4, btk=2, num_warps=4, rotate_in_kernel=True, lane_major=True)
    if rows <= 16:
        return GemmConfig(block_m=16, btk=2, num_warps=4, lane_major=True)
    return GemmConfig(block_m=32, btk=1, num_warps=8, lane_major=True)
