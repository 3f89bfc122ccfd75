"""Gated activation ``act(gate) * up`` in one Triton kernel (GELU-tanh for Gemma, SiLU for Llama-class),
and Gemma's logit softcap.

PyTorch runs it as two kernels (the activation, rounded to the compute dtype, then the product);
here both happen in fp32 registers and the product is rounded once as it is stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import FastLauncher

ACTIVATION_IDS = {"silu": 0, "gelu_pytorch_tanh": 1}


@triton.jit
def _gated_act_kernel(gate_ptr, up_ptr, out_ptr, n, stride_g, stride_u, stride_o, ACT: tl.constexpr,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = c < n
    g = tl.load(gate_ptr + row * stride_g + c, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_u + c, mask=inside, other=0.0).to(tl.float32)
    if ACT == 0:  # silu: g * sigmoid(g)
        a = g / (1.0 + tl.exp(-g))
    else:  # gelu, tanh approximation; tanh(z) = 1 - 2 / (1 + e^2z) saturates correctly at both ends
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2 / pi)
        a = 0.5 * g * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * z)))
    tl.store(out_ptr + row * stride_o + c, (a * u).to(out_ptr.dtype.element_ty), mask=inside)


_launch = FastLauncher(_gated_act_kernel)


def gated_activation_triton(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up`` for ``gate``/``up [..., n]`` (rows may be strided), in ``gate``'s dtype."""
    if activation not in ACTIVATION_IDS:
        raise ValueError(f"gated activation {activation!r} has no fused kernel (have {sorted(ACTIVATION_IDS)})")
    if gate.shape != up.shape or gate.stride(-1) != 1 or up.stride(-1) != 1:
        raise ValueError(f"gate {list(gate.shape)} and up {list(up.shape)} need the same shape, contiguous rows")
    n = gate.shape[-1]
    g2, u2 = gate.reshape(-1, n), up.reshape(-1, n)
    out = torch.empty(g2.shape, device=gate.device, dtype=gate.dtype)
    block = min(1024, triton.next_power_of_2(n))
    if g2.shape[0]:
        _launch((g2.shape[0], triton.cdiv(n, block)), g2, u2, out, n, g2.stride(0), u2.stride(0), out.stride(0),
                ACT=ACTIVATION_IDS[activation], BLOCK=block, num_warps=4, num_stages=1)
    return out.view(gate.shape)


@triton.jit
def _softcap_kernel(x_ptr, out_ptr, n, cap, BLOCK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = c < n
    z = tl.load(x_ptr + c, mask=inside, other=0.0).to(tl.float32) / cap
    tl.store(out_ptr + c, (1.0 - 2.0 / (1.0 + tl.exp(2.0 * z))) * cap, mask=inside)  # tanh(z) * cap


_softcap = FastLauncher(_softcap_kernel)


def softcap_triton(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``tanh(x / cap) * cap`` in fp32 (Gemma's final logit softcap): one kernel for the cast, the
    division, the tanh and the product."""
    x = x.contiguous()
    out = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    n = x.numel()
    if n:
        _softcap((triton.cdiv(n, 1024),), x, out, n, float(cap), BLOCK=1024, num_warps=4, num_stages=1)
    return out
