"""Plain-PyTorch reference implementations of every kernel op.

These are the oracle the Triton kernels are tested against and the path used on
CPU (or wherever Triton is unavailable). They favour clarity and exactness
(fp32 arithmetic, bit-exact decode) over speed.
"""

from .codebook import CODEBOOK_RMS, codebook_table, decode_states
from .hadamard import HADAMARD_SIZE, hadamard_128_ref, sylvester
from .linear import dense_matmul_ref, exl3_inner_ref, exl3_matmul_ref, exl3_weight_ref
from .trellis import (
    TC_PERM,
    TC_PERM_INV,
    dequant_inner_ref,
    matrix_to_tiles,
    position_end_bits,
    tiles_to_matrix,
    trellis_states,
)

__all__ = [
    "CODEBOOK_RMS",
    "HADAMARD_SIZE",
    "TC_PERM",
    "TC_PERM_INV",
    "codebook_table",
    "decode_states",
    "dense_matmul_ref",
    "dequant_inner_ref",
    "exl3_inner_ref",
    "exl3_matmul_ref",
    "exl3_weight_ref",
    "hadamard_128_ref",
    "matrix_to_tiles",
    "position_end_bits",
    "sylvester",
    "tiles_to_matrix",
    "trellis_states",
]

from .attention import (  # noqa: E402
    attention_mask,
    attention_ref,
    gather_pages,
    paged_attention_ref,
    ring_prefill_attention_ref,
)

__all__ += ["attention_mask", "attention_ref", "gather_pages", "paged_attention_ref", "ring_prefill_attention_ref"]

from .moe import exl3_moe_ref  # noqa: E402

__all__ += ["exl3_moe_ref"]

from .rope import HeadNorms, norm_rope_store_kv_ref, rope_store_kv_ref, rope_tables, rotate_neox  # noqa: E402

__all__ += ["HeadNorms", "norm_rope_store_kv_ref", "rope_store_kv_ref", "rope_tables", "rotate_neox"]
