"""Routed experts: each token's top-k expert MLPs, weighted and summed.

The routers differ per family (softmax, sigmoid + bias, sqrt-softplus, hash;
architectures.md 0.7) and live with the adapters; they all hand this block
``expert_ids [T, k]`` and ``weights [T, k]``.

Storage comes in two forms:

* EXL3 checkpoints keep one quantized linear per expert and projection
  (``...experts.{e}.gate_proj`` etc.); they are stacked into
  ``Exl3ExpertStack``s so one kernel launch serves every selected expert.
* Unquantized checkpoints keep dense expert weights, either per expert under
  the same names or fused (Gemma 4: ``experts.gate_up_proj [E, 2I, H]`` and
  ``experts.down_proj [E, H, I]``).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import nn

from ... import kernels
from ...kernels import tuning
from ...checkpoint import Checkpoint
from ...errors import CheckpointError
from ...kernels.weights import DenseWeight, Exl3ExpertStack, Exl3Weight
from ...options import RuntimeOptions
from .linear import Linear
from .mlp import ACTIVATIONS, GatedMLP, gated_activation


# Set by the converter while it records the inputs of every expert's linears: each expert then
# runs on every token (the reference converter's "calibration_all_experts"), so rarely routed
# experts still get a full Hessian. The output stays the routed mix either way.
_CALIBRATE_ALL_EXPERTS: contextvars.ContextVar[bool] = contextvars.ContextVar("exl3_all_experts", default=False)


@contextlib.contextmanager
def all_experts_see_all_tokens():
    token = _CALIBRATE_ALL_EXPERTS.set(True)
    try:
        yield
    finally:
        _CALIBRATE_ALL_EXPERTS.reset(token)


class RoutedExperts(nn.Module):
    """``y[t] = sum_j w[t, j] * down_e(act(gate_e(x[t])) * up_e(x[t]))`` with ``e = ids[t, j]``.

    Either three ``Exl3ExpertStack``s (``stacks``: gate, up, down), run by the
    MoE kernels, or one ``GatedMLP`` of ``Linear``s per expert (``mlps``), run
    expert by expert: unquantized models, and the converter, which hooks and
    swaps those ``Linear``s like any other.
    """

    def __init__(self, *, hidden_size: int, intermediate_size: int, activation: str, options: RuntimeOptions,
                 stacks: tuple[Exl3ExpertStack, Exl3ExpertStack, Exl3ExpertStack] | None = None,
                 mlps: list[GatedMLP] | None = None, limit: float | None = None):
        super().__init__()
        if (stacks is None) == (mlps is None):
            raise ValueError("give either the quantized stacks or the per-expert MLPs")
        self.quantized = stacks is not None
        self.gate_up = None
        self.backend = kernels.resolve_backend(options.backend, options.device)
        if self.quantized:
            self.gate, self.up, self.down = stacks
            if self.backend == "triton":
                self._stack_gate_up()
        else:
            self.mlps = nn.ModuleList(mlps)
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.act = ACTIVATIONS[activation]
        self.limit = limit  # SwiGLU clamp (DeepSeek-V4); the per-expert MLPs carry it too
        self.options = options

    def _stack_gate_up(self) -> None:
        """Gate and up as one stack of ``2E`` experts (gate ``e``, up ``E + e``) where their formats
        match: a token's gate and up projections are then one MoE launch over ``2k`` slots. ``gate``
        and ``up`` stay as views of it."""
        g, u = self.gate, self.up
        if g.trellis.shape != u.trellis.shape or g.bits != u.bits or g.codebook != u.codebook:
            return
        e = g.num_experts
        both = Exl3ExpertStack(torch.cat([g.trellis, u.trellis]), torch.cat([g.suh, u.suh]),
                               torch.cat([g.svh, u.svh]), g.bits, g.codebook, key=f"{g.key}+{u.key}")
        self.gate_up = both
        self.gate = Exl3ExpertStack(both.trellis[:e], both.suh[:e], both.svh[:e], g.bits, g.codebook, key=g.key)
        self.up = Exl3ExpertStack(both.trellis[e:], both.suh[e:], both.svh[e:], u.bits, u.codebook, key=u.key)

    @property
    def num_experts(self) -> int:
        return self.gate.num_experts if self.quantized else len(self.mlps)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                base: torch.Tensor | None = None) -> torch.Tensor:
        """``x [T, H]``, ``expert_ids [T, k]`` (long), ``weights [T, k]`` -> ``[T, H]`` in x's dtype.

        ``base [T, H]`` (e.g. the shared expert's output) is added to the weighted sum before its one
        rounding to x's dtype; on the Triton path the down projection's last program adds it."""
        if self.quantized:
            return self._forward_exl3(x, expert_ids, weights, base)
        return self._forward_dense(x, expert_ids, weights, base)

    def _forward_exl3(self, x, expert_ids, weights, base=None):
        pad_in = self.gate.in_features - self.hidden_size
        xp = nn.functional.pad(x, (0, pad_in)) if pad_in else x
        i = self.intermediate_size
        if self.gate_up is not None:  # one launch: slots [0, k) read the gate experts, [k, 2k) the up ones
            k = expert_ids.shape[1]
            # the schedule the two launches would have had (measured per slot count, kernels/triton_moe.py)
            gu = kernels.exl3_moe(xp, self.gate_up, expert_ids, backend=self.backend, members=2,
                                  schedule="decode" if expert_ids.numel() <= tuning.MOE_DECODE_MAX_SLOTS else "grouped")
            g, u = gu[:, :k, :i], gu[:, k:, :i]
        else:
            g = kernels.exl3_moe(xp, self.gate, expert_ids, backend=self.backend)[..., :i]
            u = kernels.exl3_moe(xp, self.up, expert_ids, backend=self.backend)[..., :i]
        h = gated_activation(self.act, g, u, self.limit)
        pad_mid = self.down.in_features - i
        if pad_mid:  # padded input rows of the down projection must see zeros
            h = nn.functional.pad(h, (0, pad_mid))
        fused_base = base is not None and self.down.out_features == self.hidden_size and base.stride(-1) == 1
        y = kernels.exl3_moe(h.contiguous(), self.down, expert_ids, weights.to(x.dtype), backend=self.backend,
                             base=base if fused_base else None)
        y = y[..., : self.hidden_size]
        return y if base is None or fused_base else (y.float() + base.float()).to(x.dtype)

    def _forward_dense(self, x, expert_ids, weights, base=None):
        out = torch.zeros(x.shape[0], self.hidden_size, dtype=torch.float32, device=x.device)
        if kernels.capturing(x.device):
            # Inside a CUDA graph nothing may wait for the GPU, so finding each expert's tokens
            # (nonzero) is out: every expert runs on every row and is weighted 0 where it was not
            # chosen. The sum is taken in the same expert order as below.
            for e, mlp in enumerate(self.mlps):
                chosen = (weights.float() * (expert_ids == e)).sum(dim=1, keepdim=True)
                out += mlp(x).float() * chosen
            return (out if base is None else out + base.float()).to(x.dtype)
        every_token = _CALIBRATE_ALL_EXPERTS.get()
        for e, mlp in enumerate(self.mlps):
            tok, slot = torch.nonzero(expert_ids == e, as_tuple=True)
            if every_token:
                y = mlp(x)[tok]
            elif tok.numel():
                y = mlp(x[tok])
            else:
                continue
            out.index_add_(0, tok, y.float() * weights[tok, slot, None].float())
        return (out if base is None else out + base.float()).to(x.dtype)


def load_routed_experts(checkpoint: Checkpoint, prefix: str, *, num_experts: int, hidden_size: int,
                        intermediate_size: int, activation: str, options: RuntimeOptions,
                        names=("gate_proj", "up_proj", "down_proj"), limit: float | None = None) -> RoutedExperts:
    """The experts under ``prefix`` (e.g. ``model.layers.3.experts``) in whichever form the checkpoint has.

    Per-expert linears ``{prefix}.{e}.{gate,up,down}``: EXL3 (stacked) or dense.
    Otherwise the fused dense form ``{prefix}.gate_up_proj`` / ``{prefix}.down_proj``,
    cut into per-expert linears named as the EXL3 ones would be.
    """
    sizes = {names[0]: (hidden_size, intermediate_size), names[1]: (hidden_size, intermediate_size),
             names[2]: (intermediate_size, hidden_size)}
    common = dict(hidden_size=hidden_size, intermediate_size=intermediate_size, activation=activation,
                  options=options, limit=limit)
    if checkpoint.linear_format(f"{prefix}.0.{names[0]}") is not None:
        weights = {name: [checkpoint.linear(f"{prefix}.{e}.{name}", in_features=n_in, out_features=n_out)
                          for e in range(num_experts)] for name, (n_in, n_out) in sizes.items()}
        every = [w for ws in weights.values() for w in ws]
        if all(isinstance(w, Exl3Weight) for w in every):
            if any(w.bias is not None for w in every):
                raise CheckpointError("expert projections with a bias are not supported", path=checkpoint.model_dir,
                                      tensor=f"{prefix}.*.bias")
            stacks = tuple(Exl3ExpertStack.from_weights([w.to(options.device) for w in weights[name]],
                                                        key=f"{prefix}.*.{name}") for name in names)
            return RoutedExperts(stacks=stacks, **common)
        if not all(isinstance(w, DenseWeight) for w in every):
            raise CheckpointError("experts mix EXL3 and unquantized storage", path=checkpoint.model_dir,
                                  tensor=f"{prefix}.*")
        per_expert = [[weights[name][e] for name in names] for e in range(num_experts)]
    elif checkpoint.has_tensor(f"{prefix}.gate_up_proj"):
        i = intermediate_size
        gate_up = _fused(checkpoint, f"{prefix}.gate_up_proj", (num_experts, 2 * i, hidden_size))
        down = _fused(checkpoint, f"{prefix}.down_proj", (num_experts, hidden_size, i))
        per_expert = [[DenseWeight(gate_up[e, :i], key=f"{prefix}.{e}.{names[0]}"),
                       DenseWeight(gate_up[e, i:], key=f"{prefix}.{e}.{names[1]}"),
                       DenseWeight(down[e], key=f"{prefix}.{e}.{names[2]}")] for e in range(num_experts)]
    else:
        raise CheckpointError(f"no experts found: expected {prefix}.0.{names[0]} (per expert) or "
                              f"{prefix}.gate_up_proj (fused)", path=checkpoint.model_dir, tensor=f"{prefix}.*")
    mlps = [GatedMLP(*(Linear(w, *sizes[name], options) for w, name in zip(ws, names)), activation, limit)
            for ws in per_expert]
    return RoutedExperts(mlps=mlps, **common)


def _fused(checkpoint: Checkpoint, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    t = checkpoint.tensor(name)
    if tuple(t.shape) != shape:
        raise CheckpointError(f"shape {list(t.shape)} does not match the config's {list(shape)}",
                              path=checkpoint.info(name).file, tensor=name)
    return t
