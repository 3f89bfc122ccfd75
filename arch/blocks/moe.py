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

import torch
from torch import nn

from ... import kernels
from ...checkpoint import Checkpoint
from ...errors import CheckpointError
from ...kernels.weights import DenseWeight, Exl3ExpertStack, Exl3Weight
from ...options import RuntimeOptions
from .mlp import ACTIVATIONS


class RoutedExperts(nn.Module):
    """``y[t] = sum_j w[t, j] * down_e(act(gate_e(x[t])) * up_e(x[t]))`` with ``e = ids[t, j]``.

    ``gate``/``up``/``down`` are either three ``Exl3ExpertStack``s or three dense
    tensors ``[E, out, in]`` (``nn.Linear`` layout).
    """

    def __init__(self, gate, up, down, *, hidden_size: int, intermediate_size: int, activation: str,
                 options: RuntimeOptions):
        super().__init__()
        self.quantized = isinstance(gate, Exl3ExpertStack)
        if self.quantized:
            self.gate, self.up, self.down = gate, up, down
        else:
            self.register_buffer("gate", gate)
            self.register_buffer("up", up)
            self.register_buffer("down", down)
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.act = ACTIVATIONS[activation]
        self.options = options
        self.backend = kernels.resolve_backend(options.backend, options.device)

    @property
    def num_experts(self) -> int:
        return self.gate.num_experts if self.quantized else self.gate.shape[0]

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``x [T, H]``, ``expert_ids [T, k]`` (long), ``weights [T, k]`` -> ``[T, H]`` in x's dtype."""
        if self.quantized:
            return self._forward_exl3(x, expert_ids, weights)
        return self._forward_dense(x, expert_ids, weights)

    def _forward_exl3(self, x, expert_ids, weights):
        pad_in = self.gate.in_features - self.hidden_size
        xp = nn.functional.pad(x, (0, pad_in)) if pad_in else x
        i = self.intermediate_size
        g = kernels.exl3_moe(xp, self.gate, expert_ids, backend=self.backend)[..., :i]
        u = kernels.exl3_moe(xp, self.up, expert_ids, backend=self.backend)[..., :i]
        h = self.act(g) * u
        pad_mid = self.down.in_features - i
        if pad_mid:  # padded input rows of the down projection must see zeros
            h = nn.functional.pad(h, (0, pad_mid))
        y = kernels.exl3_moe(h.contiguous(), self.down, expert_ids, weights.to(x.dtype), backend=self.backend)
        return y[..., : self.hidden_size]

    def _forward_dense(self, x, expert_ids, weights):
        out = torch.zeros(x.shape[0], self.hidden_size, dtype=torch.float32, device=x.device)
        for e in torch.unique(expert_ids).tolist():
            tok, slot = torch.nonzero(expert_ids == e, as_tuple=True)
            h = x[tok]
            y = nn.functional.linear(self.act(nn.functional.linear(h, self.gate[e])) * nn.functional.linear(h, self.up[e]),
                                     self.down[e])
            out.index_add_(0, tok, y.float() * weights[tok, slot, None].float())
        return out.to(x.dtype)


def load_routed_experts(checkpoint: Checkpoint, prefix: str, *, num_experts: int, hidden_size: int,
                        intermediate_size: int, activation: str, options: RuntimeOptions,
                        names=("gate_proj", "up_proj", "down_proj")) -> RoutedExperts:
    """The experts under ``prefix`` (e.g. ``model.layers.3.experts``) in whichever form the checkpoint has.

    Per-expert linears ``{prefix}.{e}.{gate,up,down}``: EXL3 (stacked) or dense.
    Otherwise the fused dense form ``{prefix}.gate_up_proj`` / ``{prefix}.down_proj``.
    """
    gate_n, up_n, down_n = names
    dev = options.device
    if checkpoint.linear_format(f"{prefix}.0.{gate_n}") is not None:
        stacks = []
        for name, n_in, n_out in ((gate_n, hidden_size, intermediate_size), (up_n, hidden_size, intermediate_size),
                                  (down_n, intermediate_size, hidden_size)):
            ws = [checkpoint.linear(f"{prefix}.{e}.{name}", in_features=n_in, out_features=n_out)
                  for e in range(num_experts)]
            if all(isinstance(w, Exl3Weight) for w in ws):
                stack = Exl3ExpertStack.from_weights([w.to(dev) for w in ws], key=f"{prefix}.*.{name}")
                if any(w.bias is not None for w in ws):
                    raise CheckpointError("expert projections with a bias are not supported",
                                          path=checkpoint.model_dir, tensor=f"{prefix}.0.{name}.bias")
            elif all(isinstance(w, DenseWeight) for w in ws):
                stack = torch.stack([w.weight for w in ws]).to(device=dev, dtype=options.dtype)
            else:
                raise CheckpointError("experts mix EXL3 and unquantized storage", path=checkpoint.model_dir,
                                      tensor=f"{prefix}.*.{name}")
            stacks.append(stack)
        if len({type(s) for s in stacks}) != 1:
            raise CheckpointError("expert projections mix EXL3 and unquantized storage", path=checkpoint.model_dir,
                                  tensor=f"{prefix}.*")
        gate, up, down = stacks
    elif checkpoint.has_tensor(f"{prefix}.gate_up_proj"):
        gate_up = _fused(checkpoint, f"{prefix}.gate_up_proj", (num_experts, 2 * intermediate_size, hidden_size), options)
        down = _fused(checkpoint, f"{prefix}.down_proj", (num_experts, hidden_size, intermediate_size), options)
        gate, up = gate_up[:, :intermediate_size].contiguous(), gate_up[:, intermediate_size:].contiguous()
    else:
        raise CheckpointError(f"no experts found: expected {prefix}.0.{gate_n} (per expert) or "
                              f"{prefix}.gate_up_proj (fused)", path=checkpoint.model_dir, tensor=f"{prefix}.*")
    return RoutedExperts(gate, up, down, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         activation=activation, options=options)


def _fused(checkpoint: Checkpoint, name: str, shape: tuple[int, ...], options: RuntimeOptions) -> torch.Tensor:
    t = checkpoint.tensor(name, dtype=options.dtype, device=options.device)
    if tuple(t.shape) != shape:
        raise CheckpointError(f"shape {list(t.shape)} does not match the config's {list(shape)}",
                              path=checkpoint.info(name).file, tensor=name)
    return t
