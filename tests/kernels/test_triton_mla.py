"""The MLA decode kernels (kernels/triton_mla.py) against their PyTorch definitions
(kernels/reference/mla.py, arch/blocks/rope.py), and MLA's decode path with the kernels in place of
its einsum path against the golden openPangu logits (read golden/openpangu/A).

Tolerances of the fp16 kernels, from fp16's unit roundoff ``U = 2^-11`` (round to nearest):

* the attention rounds q_abs, q_pe and the keys to fp16 for its products: the tests give the
  reference the same rounded values, so those products agree exactly (fp16 x fp16 is exact in
  fp32) up to fp32 summation order (~1e-6 relative). What remains is the fp16 rounding of the
  probabilities (``0 < p <= 1`` after subtracting the running maximum) before ``probs @ c``,
  while the denominator sums them unrounded: ``|d ctx_r| <= sum_i U p_i |c_ir| / sum_i p_i
  <= U max|c|``, plus ``2^-25`` per key for probabilities in fp16's subnormal range.
* the q prologue's sums are fp32 (products of fp16 values exact), rounded once to fp16 like the
  reference's: the two differ by at most one fp16 ulp, ``2U |x|`` (``2^-24`` near 0).
* the merge's ``w_uv`` product carries the context's error through ``sum_r |w_vr|`` and is rounded
  once to fp16 (``U |o|``).
"""

import pytest
import torch

from exl3_triton.arch.blocks.rope import fold_sin, rotate_neox_folded
from exl3_triton.kernels.reference.mla import (index_scores_reference, mla_decode_out_reference,
                                                mla_decode_reference, mla_q_prologue_reference)

PAGE = 4
U = 2.0 ** -11  # fp16 unit roundoff
# rows of 40+ keys spread over several programs, and few programs for the interpreter to run
SMALL_SPLITS = dict(block_n=16, splits=4, min_split=16, precision="tf32x3", num_warps=4, num_stages=1)
HALF_SPLITS = dict(block_n=16, splits=4, min_split=16, precision="fp16")


def _scene(*, heads=3, rank=40, rope_dim=16, sinks=5, ring_pages=None, dtype=torch.float32, seed=0):
    """Decode rows of three sequences: two alone at different positions, and one verifying four
    consecutive positions (a drafted chain: each row's table is its sequence's, later rows see the
    earlier rows' entries). Page tables are -1 past each row's last page. With ``ring_pages``, each
    sequence owns a ring of that many pages (position p at ring page ``(p // PAGE) % ring_pages``),
    so long rows wrap around it."""
    g = torch.Generator().manual_seed(seed)
    positions = torch.tensor([2, 29, 40, 41, 42, 43])
    seq_of_row = [0, 1, 2, 2, 2, 2]
    max_pages = 12  # logical pages per table row: 48 positions
    num_pages = 3 * (ring_pages or max_pages) + 2
    table = torch.full((len(positions), max_pages), -1, dtype=torch.int32)
    for i, (seq, pos) in enumerate(zip(seq_of_row, positions.tolist())):
        for lp in range(pos // PAGE + 1):
            if ring_pages is None:  # scattered pages, not in order
                table[i, lp] = (7 * (seq * max_pages + lp) + 3) % (3 * max_pages) + 2
            else:
                table[i, lp] = seq * ring_pages + lp % ring_pages
    n = len(positions)
    q_abs = torch.randn(n, heads, rank, generator=g)
    q_pe = torch.randn(n, heads, rope_dim, generator=g)
    c = torch.randn(num_pages, PAGE, rank, generator=g).to(dtype)
    kpe = torch.randn(num_pages, PAGE, rope_dim, generator=g).to(dtype)
    sink_c = torch.randn(sinks, rank, generator=g)
    sink_pe = torch.randn(sinks, rope_dim, generator=g)
    return dict(q_abs=q_abs, q_pe=q_pe, sink_c=sink_c, sink_pe=sink_pe, c=c, kpe=kpe, table=table,
                positions=positions), g


def _on(device, inputs):
    return {k: v.to(device) for k, v in inputs.items()}


def _check(triton_kernels, device, inputs, *, tol=2e-5, launch=None, **kw):
    """The kernel (with ``launch`` settings) against the reference, both given ``kw``."""
    want = mla_decode_reference(**inputs, **kw)
    got = triton_kernels.mla.mla_decode_triton(**_on(device, inputs), **{
        k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()}, **(launch or {})).cpu()
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=tol, atol=tol), (got - want).abs().max()
    return want


@pytest.mark.parametrize("window,sinks,ring_pages", [(None, 5, None), (None, 0, None), (9, 5, None), (9, 0, 3),
                                                     (8, 5, 2)])
def test_decode_kernel_matches_the_reference(triton_kernels, device, window, sinks, ring_pages):
    inputs, _ = _scene(sinks=sinks, ring_pages=ring_pages)
    _check(triton_kernels, device, inputs, scale=0.3, window=window, launch=SMALL_SPLITS)


def test_decode_kernel_reads_only_visible_keys(triton_kernels, device):
    """Entries past a row's position, outside its window, or behind an unused (-1) page-table entry
    never reach the result: poisoning them with NaN changes nothing."""
    inputs, _ = _scene()
    want = _check(triton_kernels, device, inputs, scale=0.3, window=9, launch=SMALL_SPLITS)
    poisoned = dict(inputs, c=inputs["c"].clone(), kpe=inputs["kpe"].clone())
    seen = set()
    for i, pos in enumerate(inputs["positions"].tolist()):
        for p in range(max(0, pos - 8), pos + 1):
            seen.add(int(inputs["table"][i, p // PAGE]) * PAGE + p % PAGE)
    hidden = torch.tensor(sorted(set(range(inputs["c"].shape[0] * PAGE)) - seen))
    poisoned["c"].view(-1, inputs["c"].shape[-1])[hidden] = float("nan")
    poisoned["kpe"].view(-1, inputs["kpe"].shape[-1])[hidden] = float("nan")
    got = triton_kernels.mla.mla_decode_triton(**_on(device, poisoned), scale=0.3, window=9, **SMALL_SPLITS).cpu()
    assert torch.allclose(got, want, rtol=2e-5, atol=2e-5)


def test_decode_kernel_in_half_precision(triton_kernels, device):
    inputs, _ = _scene(dtype=torch.float16, rank=32)
    _check(triton_kernels, device, inputs, scale=0.3, tol=1e-4, launch=SMALL_SPLITS)


def _rounded(inputs):
    """The scene with q and the sinks rounded to fp16 as the fp16 kernels round them (the cache is fp16)."""
    return dict(inputs, **{k: inputs[k].half() for k in ("q_abs", "q_pe")},
                **{k: inputs[k].half().float() for k in ("sink_c", "sink_pe")})


def _half_bound(inputs, keys: int = 48) -> float:
    """``U max|c|`` over the sinks and the cache, plus the subnormal term (module docstring)."""
    biggest = torch.cat([inputs["c"].float().flatten(), inputs["sink_c"].float().flatten()]).abs().max().item()
    return (U + keys * 2.0 ** -25) * biggest + 1e-5


@pytest.mark.parametrize("window,sinks,ring_pages,launch", [
    (None, 5, None, {}), (None, 0, None, {}), (9, 5, None, {}), (9, 0, 3, {}), (8, 5, 2, {}),
    (None, 5, None, dict(r_parts=2)), (9, 5, 3, dict(r_parts=4, block_h=32)), (None, 5, None, dict(num_stages=1))])
def test_half_decode_kernel_matches_the_reference(triton_kernels, device, window, sinks, ring_pages, launch):
    """fp16 operands (the default precision): the reference on the same fp16-rounded q, sinks and cache."""
    inputs, _ = _scene(sinks=sinks, ring_pages=ring_pages, dtype=torch.float16)
    inputs = _rounded(inputs)
    _check(triton_kernels, device, inputs, scale=0.3, window=window, tol=_half_bound(inputs),
           launch={**HALF_SPLITS, **launch})


def test_half_decode_kernel_reads_only_visible_keys_and_honours_the_selection(triton_kernels, device):
    inputs, g = _scene(dtype=torch.float16)
    inputs = _rounded(inputs)
    k = 7
    selected = torch.stack([torch.randperm(int(p) + 1, generator=g)[:k] if p + 1 > k else torch.zeros(k).long()
                            for p in inputs["positions"]])
    want = _check(triton_kernels, device, inputs, scale=0.3, selected=selected, tol=_half_bound(inputs),
                  launch=HALF_SPLITS)
    poisoned = dict(inputs, c=inputs["c"].clone(), kpe=inputs["kpe"].clone())
    seen = set()
    for i, pos in enumerate(inputs["positions"].tolist()):
        for p in (selected[i].tolist() if pos + 1 > k else range(pos + 1)):
            seen.add(int(inputs["table"][i, p // PAGE]) * PAGE + p % PAGE)
    hidden = torch.tensor(sorted(set(range(inputs["c"].shape[0] * PAGE)) - seen))
    poisoned["c"].view(-1, inputs["c"].shape[-1])[hidden] = float("nan")
    poisoned["kpe"].view(-1, inputs["kpe"].shape[-1])[hidden] = float("nan")
    got = triton_kernels.mla.mla_decode_triton(**_on(device, poisoned), scale=0.3, selected=selected.to(device),
                                               **HALF_SPLITS).cpu()
    assert torch.allclose(got, want, rtol=0, atol=_half_bound(inputs))


@pytest.mark.parametrize("v_parts,window", [(1, None), (2, 9)])
def test_decode_out_kernel_applies_w_uv_in_the_merge(triton_kernels, device, v_parts, window):
    """o[n, h*V:(h+1)*V] = ctx[n, h] @ w_uv[h]^T in fp16: V = 24 (a partial column block of 16)."""
    inputs, g = _scene(dtype=torch.float16)
    inputs = _rounded(inputs)
    heads, rank = inputs["q_abs"].shape[1:]
    w_uv = torch.randn(heads, 24, rank, generator=g).half()
    want = mla_decode_out_reference(**inputs, w_uv=w_uv, scale=0.3, window=window, out_dtype=torch.float32)
    got = triton_kernels.mla.mla_decode_out_triton(**_on(device, inputs), w_uv=w_uv.to(device), scale=0.3,
                                                   window=window, v_parts=v_parts, out_block_v=16,
                                                   **HALF_SPLITS).cpu()
    assert got.dtype == torch.float16 and got.shape == want.shape
    # the context's bound carried through |w_uv| (per output column), then one fp16 rounding of the output
    carried = _half_bound(inputs) * w_uv.float().abs().sum(-1).flatten()
    assert ((got.float() - want).abs() <= carried + U * want.abs() + 1e-5).all()


@pytest.mark.parametrize("n", [3, 18])  # 18: two row blocks of 16
def test_q_prologue_matches_the_einsum_and_the_rope(triton_kernels, device, n):
    """q_abs = q_nope @ w_uk[h] and the NEOX-rotated q_pe, both within one fp16 ulp of the fp32 results
    rounded to fp16 (nope 24, rank 40 with column blocks of 32: partial blocks everywhere)."""
    g = torch.Generator().manual_seed(1)
    heads, nope, rope_dim, rank = 3, 24, 16, 40
    q = torch.randn(n, heads, nope + rope_dim, generator=g).half()
    w_uk = (torch.randn(heads, nope, rank, generator=g) * 0.2).half()
    angles = torch.rand(n, rope_dim // 2, generator=g) * 6
    cos, sin = torch.cat([angles, angles], -1).cos(), fold_sin(torch.cat([angles, angles], -1).sin())
    want_abs, want_pe = mla_q_prologue_reference(q, w_uk, cos, sin)
    # the reference's rotation is the model's (arch/blocks/rope.py)
    assert torch.equal(want_pe, rotate_neox_folded(q[..., nope:].float(), cos[:, None], sin[:, None]).half())
    q_abs, q_pe = triton_kernels.mla.mla_q_prologue_triton(q.to(device), w_uk.to(device), cos.to(device),
                                                           sin.to(device), block_r=32)
    for got, want in ((q_abs.cpu(), want_abs), (q_pe.cpu(), want_pe)):
        assert got.dtype == torch.float16 and got.shape == want.shape
        assert ((got.float() - want.float()).abs() <= 2 * U * want.float().abs() + 2.0 ** -24).all()


def test_decode_kernel_honours_the_selection(triton_kernels, device):
    """Rows with more candidates than the selection keeps read only the selected positions; rows
    with fewer read all of theirs (the selection's columns are then ignored)."""
    inputs, g = _scene()
    k = 7
    selected = torch.stack([torch.randperm(int(p) + 1, generator=g)[:k] if p + 1 > k else torch.zeros(k).long()
                            for p in inputs["positions"]])
    want = _check(triton_kernels, device, inputs, scale=0.3, selected=selected, launch=SMALL_SPLITS)
    # the definition differs from plain causal attention exactly on rows with more than k candidates
    plain = mla_decode_reference(**inputs, scale=0.3)
    assert torch.allclose(want[0], plain[0])
    assert not torch.allclose(want[1:], plain[1:], atol=1e-3)


@pytest.mark.parametrize("window", [None, 6])
def test_index_scores_match_the_reference_and_pick_the_same_top_k(triton_kernels, device, window):
    inputs, g = _scene()
    groups, dim = 5, 24
    q = torch.randn(6, groups, dim, generator=g)
    w = torch.randn(6, groups, generator=g)
    keys = torch.randn(inputs["c"].shape[0], PAGE, dim, generator=g)
    table, positions = inputs["table"], inputs["positions"]
    want = index_scores_reference(q, w, keys, table, positions, window=window)
    got = triton_kernels.mla.index_scores_triton(q.to(device), w.to(device), keys.to(device), table.to(device),
                                                 positions.to(device), window=window, block_n=16, span=32).cpu()
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.allclose(got[~torch.isinf(want)], want[~torch.isinf(want)], rtol=1e-5, atol=1e-5)
    k = 8
    assert torch.equal(torch.topk(got, k).indices.sort().values, torch.topk(want, k).indices.sort().values)


def test_decode_kernel_names_bad_input(triton_kernels, device):
    inputs, _ = _scene()
    mla = triton_kernels.mla
    with pytest.raises(ValueError, match="kpe"):
        mla.mla_decode_triton(**_on(device, dict(inputs, kpe=inputs["kpe"].flatten(0, 1))), scale=1.0)
    with pytest.raises(ValueError, match="sink"):
        mla.mla_decode_triton(**_on(device, dict(inputs, sink_c=inputs["sink_c"].half())), scale=1.0)
    with pytest.raises(ValueError, match="precision"):
        mla.mla_decode_triton(**_on(device, inputs), scale=1.0, precision="bf17")
    with pytest.raises(ValueError, match="r_parts"):
        mla.mla_decode_triton(**_on(device, inputs), scale=1.0, precision="tf32x3", r_parts=2)
    with pytest.raises(ValueError, match="w_uv"):
        mla.mla_decode_out_triton(**_on(device, inputs), w_uv=torch.zeros(2, 8, 40, device=device), scale=1.0)
    with pytest.raises(ValueError, match="w_uk"):
        mla.mla_q_prologue_triton(torch.zeros(1, 3, 40, device=device), torch.zeros(3, 24, 40, 1, device=device),
                                  torch.zeros(1, 16, device=device), torch.zeros(1, 16, device=device))
    with pytest.raises(ValueError, match="cos"):
        mla.mla_q_prologue_triton(torch.zeros(1, 3, 40, device=device), torch.zeros(3, 24, 40, device=device),
                                  torch.zeros(2, 16, device=device), torch.zeros(2, 16, device=device))


def test_openpangu_decode_with_the_mla_kernels_matches_the_golden_logits(triton_kernels, golden, monkeypatch):
    """MLA's decode path with the fp16 kernels in place of its einsum path (as on a GPU: the q
    prologue, the attention with the merge's w_uv product, the index scores), past the window and
    the indexer's top-k: the golden reference's logits. The golden model runs in fp32 here, so the
    kernels' fp16 roundings (q_abs, q_pe, the keys, the probabilities: each relative ``U``; the
    weights are bf16 values, exact in fp16) are the only difference from the einsum path: the
    logits stay within ``4 U`` (relative) of the reference and pick the same tokens."""
    import functools
    from types import SimpleNamespace

    import exl3_triton
    from exl3_triton.arch.blocks import mla
    from safetensors.torch import load_file

    from ..runtime_helpers import cached_logits

    model = exl3_triton.load(golden / "openpangu" / "A")
    ref = load_file(str(golden / "openpangu" / "A" / "golden.safetensors"))
    calls = []

    def counted(kernel):
        def run(*args, **kw):
            calls.append(getattr(kernel, "func", kernel).__name__)
            return kernel(*args, **kw)
        return run

    # few splits: the interpreter runs every program of the grid, empty or not
    kernels = SimpleNamespace(
        q_prologue=counted(triton_kernels.mla.mla_q_prologue_triton),
        decode_out=counted(functools.partial(triton_kernels.mla.mla_decode_out_triton, **HALF_SPLITS)),
        index_scores=counted(triton_kernels.mla.index_scores_triton))
    monkeypatch.setattr(mla, "_fused_mla", lambda x: kernels)
    assert model.network.decode_context_buckets() == (16,)  # the indexer's top_k
    # below position 16 no row has more candidates than the indexer keeps: the steps skip its scores
    cached_logits(model, ref["ids"][:16].tolist(), chunks=[12], page_size=16)
    assert "mla_q_prologue_triton" in calls and "index_scores_triton" not in calls
    calls.clear()
    ids = ref["ids"][:36].tolist()  # decode from 12: past the window (16) and the top-k (16)
    step = cached_logits(model, ids, chunks=[12], page_size=16)
    # decode steps went through the kernels, the indexer's from position 16 on
    assert {"mla_q_prologue_triton", "mla_decode_out_triton", "index_scores_triton"} <= set(calls)
    assert calls.count("index_scores_triton") == 2 * (36 - 16)  # two DSA layers, 20 steps
    want = ref["logits"][:36].double()
    assert ((step.double() - want).norm(dim=-1) / want.norm(dim=-1)).max() < 4 * U
    assert torch.equal(step.argmax(-1), ref["logits"][:36].argmax(-1))


_COMPILE_DEFAULTS = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from exl3_triton.kernels import triton_mla as m

fn = m._mla_split_kernel
half = m.PRECISION == "fp16"
pointers = {"c_ptr": "*fp16", "kpe_ptr": "*fp16", "table_ptr": "*i32", "pos_ptr": "*i64", "sel_ptr": "*i64",
            "q_ptr": "*fp16" if half else "*fp32", "qpe_ptr": "*fp16" if half else "*fp32"}
consts = dict(R=512, P=64, BLOCK_H=m.BLOCK_H, BLOCK_N=m.BLOCK_N, SPLITS=m.SPLITS, MIN_SPLIT=m.MIN_SPLIT,
              HAS_WINDOW=False, HAS_SEL=True, PRECISION="ieee" if half else m.PRECISION, HALF=half,
              R_PARTS=m.R_PARTS)
signature = {n: "constexpr" if n in consts else pointers.get(n, "*fp32" if n.endswith("_ptr") else
             "fp32" if n == "scale_log2" else "i32") for n in fn.arg_names}
# as a launch at Flash shapes specializes: aligned pointers, integers multiples of 16 (vectorised loads)
attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
         if signature[n] not in ("constexpr", "fp32")}
kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                        target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": m.NUM_WARPS, "num_stages": m.NUM_STAGES})
print(kernel.metadata.shared)
"""


def test_default_launch_fits_an_h100s_shared_memory():
    """Compiled for sm_90 here (Triton ships ptxas): the default settings at Flash shapes (R=512,
    P=64, with the selection) must fit the 227 KB a block may use, or every decode step would
    fail at launch on the GPU. In a subprocess: this process runs Triton's interpreter."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_DEFAULTS], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) <= 232448
