"""Count the aten ops of one decode step on a CPU, per layer and per module (issue 8).

    python bench/count_ops.py --arch openpangu_v2 --synthetic tiny [--batch 1] [--prefill-len 40] [--out DIR]
    python bench/count_ops.py --arch gemma4 --synthetic tiny

Builds the synthetic model (bench/synthetic.py) on the CPU, prefills ``--prefill-len``
random tokens per sequence through the paged cache, then runs one decode step under a
``TorchDispatchMode`` that records every aten op together with the module that issued it.
In a CUDA graph each such op is (about) one kernel, and at batch 1 a small kernel costs
2-3 us of GPU time whatever it does, so this count is the lever for decode speed.

Ops issued inside a ``Linear`` or the routed experts are reported apart ("matmul"): on a
GPU they are one EXL3 / cuBLAS kernel each, on a CPU a reference decode of many ops.
CPU and GPU also differ where a module picks a fused kernel on CUDA only (RMSNorm's
``rms_norm``, the mHC site Triton kernels): the CPU count is an upper bound there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import synthetic_name  # noqa: E402
from synthetic import SyntheticCheckpoint  # noqa: E402

from exl3_triton.model import load_checkpoint  # noqa: E402

# ops that allocate or reinterpret without a kernel of their own
NO_KERNEL = {"aten._reshape_alias", "aten._unsafe_view", "aten.alias", "aten.as_strided", "aten.chunk",
             "aten.detach", "aten.diagonal", "aten.empty", "aten.empty_like", "aten.empty_strided",
             "aten.expand", "aten.expand_as", "aten.flatten", "aten.is_same_size", "aten.lift_fresh",
             "aten.narrow", "aten.new_empty", "aten.new_empty_strided", "aten.permute", "aten.real",
             "aten.reshape", "aten.select", "aten.slice", "aten.split", "aten.split_with_sizes",
             "aten.squeeze", "aten.squeeze_", "aten.sym_numel", "aten.sym_size", "aten.sym_stride", "aten.t",
             "aten.transpose", "aten.unbind", "aten.unflatten", "aten.unfold", "aten.unsqueeze",
             "aten.unsqueeze_", "aten.view", "aten.view_as"}
MATMUL_MODULES = ("Linear", "RoutedExperts")


class _ModuleStack:
    """The modules being run right now (global forward hooks), innermost last."""

    def __init__(self):
        self.stack: list[str] = []
        self.names: dict[int, str] = {}

    def __enter__(self):
        def pre(module, args):
            self.stack.append(self.names.get(id(module), type(module).__name__))

        def post(module, args, out):
            self.stack.pop()

        self.handles = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
                        torch.nn.modules.module.register_module_forward_hook(post)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


class OpCounter(TorchDispatchMode):
    """Records ``(module path, op name)`` of every aten op that launches a kernel.

    Composite ops (einsum, ``to``, linear...) are decomposed first, so a ``.to()`` that changes
    nothing or an einsum's reshapes count as the kernels they really are."""

    def __init__(self, modules: _ModuleStack):
        super().__init__()
        self.modules = modules
        self.ops: list[tuple[tuple[str, ...], str]] = []
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        with self:  # the mode is off inside its own handler: the decomposition's ops come back here
            out = func.decompose(*args, **kwargs)
        if out is not NotImplemented:
            return out
        name = "aten." + str(func.overloadpacket).split(".")[-1]
        if name not in NO_KERNEL:
            self.ops.append((tuple(self.modules.stack), name))
        return func(*args, **kwargs)

    def opaque(self, name: str, fn):
        """``fn`` counted as one kernel ``name`` (what the GPU runs fused; nothing inside it counts,
        other stand-ins included: a fused kernel's reference may call another's, e.g. an RMSNorm)."""
        def run(*args, **kwargs):
            if not self.paused:
                self.ops.append((tuple(self.modules.stack), name))
            self.paused += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.paused -= 1
        return run


def _decode_kernel_stand_ins(counter: OpCounter):
    """``(module, attr, replacement)`` for the kernel entry points that run one Triton kernel on
    CUDA but their PyTorch reference on a CPU: the fused RoPE + cache store and the paged decode
    attention (only where the GPU takes it: a pure decode step with device-side lengths)."""
    from exl3_triton import kernels

    rope = counter.opaque("triton.rope_store_kv", kernels.rope_store_kv)
    attend = counter.opaque("triton.paged_decode_attention", kernels.paged_attention)
    paged = kernels.paged_attention

    def paged_attention(*args, **kwargs):
        gpu_kernel = kwargs.get("is_decode") and kwargs.get("kv_lens_t") is not None
        return (attend if gpu_kernel else paged)(*args, **kwargs)

    return [(kernels, "rope_store_kv", rope), (kernels, "paged_attention", paged_attention)]


@contextlib.contextmanager
def gpu_fused_kernels(counter: OpCounter):
    """Take the CUDA-only fused paths on the CPU, each counted as the one kernel it is there:
    ``F.rms_norm`` and the Triton norm with its casts (RMSNorm), the mHC site kernels, the MoME decode,
    the MLA key side, the indexer's queries and the MLA decode Triton kernels,
    the residual add + norms, the gated activation, the logit softcap, the router's selection, the fused
    RoPE (+ head norms) + cache store and the paged decode attention (run as their PyTorch references)."""
    from exl3_triton.arch.blocks import lightning_indexer, mhc, mla, mlp, norm, routing, short_conv
    try:
        from exl3_triton.arch.blocks import residual_norm, softcap
    except ImportError:  # a tree from before the fused residual norm (counting a baseline)
        residual_norm = softcap = None

    stand_ins = [(norm, "_fused_rms_norm_for", "fused.rms_norm", getattr(torch.nn.functional, "rms_norm", None)),
                 (norm, "_fused_rms_norm_cast_for", "triton.rms_norm", getattr(norm, "rms_norm_cast_reference", None)),
                 (residual_norm, "_fused_residual_norm", "triton.residual_norm",
                  getattr(residual_norm, "residual_norm_reference", None)),
                 (mlp, "_fused_gated_activation", "triton.gated_activation",
                  getattr(mlp, "gated_activation_reference", None)),
                 (softcap, "_fused_softcap", "triton.softcap", getattr(softcap, "softcap_reference", None)),
                 (mhc, "_fused_weights", "triton.mhc_weights", getattr(mhc, "site_weights_reference", None)),
                 (mhc, "_fused_site_partials", "triton.mhc_site_partials", getattr(mhc, "site_partials_reference", None)),
                 (mhc, "_fused_site_enter", "triton.mhc_site_enter", getattr(mhc, "site_enter_reference", None)),
                 (mhc, "_fused_site_exit", "triton.mhc_site_exit", getattr(mhc, "site_exit_reference", None)),
                 (mla, "_fused_mome", "triton.mome_decode", getattr(short_conv, "mome_decode_reference", None)),
                 (mla, "_fused_store_keys", "triton.mla_store_keys", getattr(mla, "store_keys_reference", None)),
                 (lightning_indexer, "_fused_leading_rope", "triton.index_queries",
                  getattr(lightning_indexer, "queries_reference", None)),
                 (routing, "_fused_selection", "triton.router_select", getattr(routing, "select_reference", None))]
    saved = []
    for module, attr, name, reference in stand_ins:
        if hasattr(module, attr) and reference is not None:  # older trees lack some (counting a baseline)
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, lambda x, fn=counter.opaque(name, reference): fn)
    for module, attr, replacement in _decode_kernel_stand_ins(counter):
        saved.append((module, attr, getattr(module, attr)))
        setattr(module, attr, replacement)
    if hasattr(mla, "_fused_mla"):  # the MLA decode kernels: split + merge, and the indexer's scores
        from types import SimpleNamespace

        from exl3_triton.kernels.reference import mla as mla_reference

        split = counter.opaque("triton.mla_decode_split", mla_reference.mla_decode_reference)
        merge = counter.opaque("triton.mla_decode_merge", lambda ctx: ctx)
        kernels = SimpleNamespace(decode=lambda *a, **kw: merge(split(*a, **kw)),
                                  index_scores=counter.opaque("triton.mla_index_scores",
                                                              mla_reference.index_scores_reference))
        if hasattr(mla_reference, "mla_q_prologue_reference"):  # the q prologue and the merge with w_uv
            split_out = counter.opaque("triton.mla_decode_split", mla_reference.mla_decode_out_reference)
            merge_out = counter.opaque("triton.mla_decode_merge_out", lambda o: o)
            kernels.decode_out = lambda *a, **kw: merge_out(split_out(*a, **kw))
            kernels.q_prologue = counter.opaque("triton.mla_q_prologue", mla_reference.mla_q_prologue_reference)
        saved.append((mla, "_fused_mla", mla._fused_mla))
        mla._fused_mla = lambda x: kernels
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def name_modules(network: torch.nn.Module) -> dict[int, str]:
    """``id(module) -> "ClassName"``, decoder layers as ``"layer{i}:kind"`` (the layer's kind
    names what runs in it: dsa / swa / full attention, dense / moe MLP, block post norm)."""
    names = {}
    for name, m in network.named_modules():
        names[id(m)] = type(m).__name__
    for i, layer in enumerate(getattr(network, "layers", [])):
        names[id(layer)] = f"layer{i}:{layer_kind(layer)}"
    for i, layer in enumerate(getattr(network, "mtp_layers", [])):
        names[id(layer)] = f"mtp{i}:{layer_kind(layer)}"
    return names


def layer_kind(layer) -> str:
    attn = getattr(layer, "self_attn", None)
    parts = []
    if attn is not None:
        if getattr(attn, "indexer", None) is not None:
            parts.append("dsa")
        else:  # sliding-window or full attention (Gemma 4 has both kinds)
            parts.append("swa" if getattr(attn, "window", None) else "full")
    mlp = getattr(layer, "mlp", None)
    if mlp is not None:
        parts.append("moe" if hasattr(mlp, "router") else "dense")
    if getattr(layer, "block_post_norm", None) is not None:
        parts.append("postnorm")
    return "-".join(parts)


def summarise(ops: list[tuple[tuple[str, ...], str]]) -> dict:
    """Totals, per layer, per layer kind (mean over the layers of that kind) and per module class."""
    per_layer = defaultdict(Counter)  # layer -> {"other": n, "matmul": n}
    per_module = Counter()
    per_op = Counter()
    for stack, op in ops:
        layer = next((s for s in stack if s.startswith(("layer", "mtp"))), "outside layers")
        matmul = any(s in MATMUL_MODULES for s in stack)
        per_layer[layer]["matmul" if matmul else "other"] += 1
        if not matmul:
            inner = stack[-1] if stack else "(top)"
            per_module[inner] += 1
            per_op[op] += 1
    kinds = defaultdict(list)
    for layer, c in per_layer.items():
        kind = layer.split(":", 1)[1] if ":" in layer else layer
        prefix = "mtp " if layer.startswith("mtp") else ""
        kinds[prefix + kind].append(c["other"])
    other = sum(c["other"] for c in per_layer.values())
    return {
        "ops_total": len(ops),
        "ops_outside_matmuls": other,
        "ops_in_matmuls": len(ops) - other,
        "per_layer_kind_mean_outside_matmuls": {k: sum(v) / len(v) for k, v in sorted(kinds.items())},
        "per_layer": {k: dict(v) for k, v in per_layer.items()},
        "per_module_outside_matmuls": dict(per_module.most_common()),
        "per_op_outside_matmuls": dict(per_op.most_common()),
    }


def count_decode_step(model, batch: int, prefill_len: int, seed: int = 0, gpu_like: bool = True) -> dict:
    """Prefill ``batch`` sequences of ``prefill_len`` tokens, then count one decode step's ops
    (``gpu_like``: the CUDA-only fused kernels counted as one op each, see ``gpu_fused_kernels``)."""
    from exl3_triton.runtime.cache import PagedCache
    from exl3_triton.runtime.runner import ModelRunner, StepItem

    net = model.network
    page = 16
    pages = -(-(prefill_len + 2) // page)
    cache = PagedCache(net.cache_spec(), num_pages=batch * pages + 1, page_size=page, max_seqs=batch)
    runner = ModelRunner(net, cache, max_pages_per_seq=pages, use_cuda_graphs=False)
    g = torch.Generator().manual_seed(seed)
    seqs = [cache.new_sequence() for _ in range(batch)]
    with torch.inference_mode():
        for seq in seqs:
            cache.reserve(seq, prefill_len + 1)
            ids = torch.randint(0, net.vocab_size, (prefill_len,), generator=g).tolist()
            runner.run([StepItem(seq, ids, True)])
        step = [StepItem(s, [int(torch.randint(0, net.vocab_size, (1,), generator=g))], True) for s in seqs]
        ids_t, fb, _ = runner.build_batch(step)
        if not fb.is_decode:
            raise RuntimeError("the counted step is not a decode step")
        modules = _ModuleStack()
        modules.names = name_modules(net)
        counter = OpCounter(modules)
        fused = gpu_fused_kernels(counter) if gpu_like else contextlib.nullcontext()
        with modules, fused, counter:
            logits = net.forward_batch(ids_t, fb)
    out = summarise(counter.ops)
    out["logits_checksum"] = float(logits.double().sum())
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="openpangu_v2")
    p.add_argument("--synthetic", default="tiny")
    p.add_argument("--bits", type=float, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prefill-len", type=int, default=40)
    p.add_argument("--out", default=None, help="folder for ops-<name>-b<batch>.json")
    p.add_argument("--cpu-paths", action="store_true",
                   help="count the CPU reference of RMSNorm and the mHC weights instead of the GPU's fused kernels")
    p.add_argument("--detail", action="store_true", help="print the per-module and per-op tables too")
    args = p.parse_args()
    torch.manual_seed(0)
    name = synthetic_name(args.arch, args.synthetic)
    ckpt = SyntheticCheckpoint(name, bits=args.bits, head_bits=args.bits, device="cpu", dtype=torch.float16)
    model = load_checkpoint(ckpt, device="cpu", dtype=torch.float16)
    res = count_decode_step(model, args.batch, args.prefill_len, gpu_like=not args.cpu_paths)
    show = res if args.detail else {k: v for k, v in res.items() if not k.startswith("per_module")
                                    and not k.startswith("per_op") and k != "per_layer"}
    print(json.dumps(show, indent=1))
    if args.out:
        path = Path(args.out) / f"ops-{name}-b{args.batch}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
