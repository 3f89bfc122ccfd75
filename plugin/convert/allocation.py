"""Bit allocation: which bits per weight each linear gets so that the average meets ``--bits``.

Format reference: shared ``exl3-format.md`` sections 6.7 and 10.1 (the
reference's ``create_q_strategy``).

Every budgeted linear starts at the largest supported rate not above
``bits``. Then whole bit groups (a layer's q/k/v together, its o, its gate/up,
its down) are raised one rate step at a time, in priority order (attention
first), then by distance to the nearer end of the layer stack (end layers
matter most), then by layer index, for as long as the total stays within
``bits x weights``. Rates are the integers 1..8 and, with the MUL1 codebook,
also 1.5 / 2.5 / 3.5 below 4 bits. The head is outside the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .families import LinearSpec


def rate_floor(bits: float, half_steps: bool) -> float:
    rate = math.floor(bits * 2) / 2 if half_steps and bits < 4 else math.floor(bits)
    return float(max(1, min(8, rate)))


def rate_next(bits: float, half_steps: bool) -> float:
    return float(min(8, bits + (0.5 if half_steps and bits < 4 else 1)))


@dataclass
class Allocation:
    bits: dict[str, float]  # module key -> bits per weight
    average: float  # achieved average over the budgeted linears


def allocate_bits(
    linears: list[LinearSpec],
    numel: dict[str, int],
    bits: float,
    half_steps: bool,
) -> Allocation:
    """Per-linear bits for a target average ``bits``; ``numel[key]`` is each linear's (padded) weight count."""
    base = rate_floor(bits, half_steps)
    chosen = {spec.key: base for spec in linears}
    total_numel = sum(numel[spec.key] for spec in linears)
    budget = int(bits * total_numel)
    used = sum(numel[k] * b for k, b in chosen.items())

    groups: dict[str, list[LinearSpec]] = {}
    for spec in linears:
        groups.setdefault(spec.bit_group, []).append(spec)
    last_layer = max((spec.layer for spec in linears), default=0)

    def order_key(item):
        index, (name, specs) = item
        layer = specs[0].layer
        distance = min(layer, last_layer - layer)
        return (-max(s.priority for s in specs), distance, layer, index)

    order = [specs for _, (_, specs) in sorted(enumerate(groups.items()), key=order_key)]
    while used < budget:
        raised = False
        for specs in order:
            cost = sum((rate_next(chosen[s.key], half_steps) - chosen[s.key]) * numel[s.key] for s in specs)
            if cost > 0 and used + cost <= budget:
                for s in specs:
                    chosen[s.key] = rate_next(chosen[s.key], half_steps)
                used += cost
                raised = True
        if not raised:
            break
    return Allocation(bits=chosen, average=used / total_numel if total_numel else 0.0)
