"""The Triton tile encoder against the PyTorch one (the reference and CPU path), under the interpreter.

Both run the same two-pass tail-biting Viterbi with the same tie-breaking (smallest
predecessor index, smallest final state), so the chosen states must be identical, not
merely as good. One tile per case keeps the interpreter's cost down (~5-20 s each);
``bench/convert.py`` checks every rate and codebook on the GPU.
"""

import pytest
import torch

from exl3_triton.convert.tile_encoder import _use_triton, encode_tiles, is_tail_biting
from exl3_triton.kernels.reference.codebook import CODEBOOK_RMS
from exl3_triton.kernels.weights import Codebook


def _targets(cb, seed, tiles=1):
    return torch.randn(tiles, 256, generator=torch.Generator().manual_seed(seed)) * CODEBOOK_RMS[cb]


@pytest.mark.parametrize("bits,cb", [(4, Codebook.MCG), (2.5, Codebook.MUL1), (8, Codebook.THREE_INST)])
def test_kernel_chooses_the_reference_states(triton_kernels, device, bits, cb):
    # On a CPU the interpreter runs the whole-step form (a few operations per step); on a GPU
    # the per-thread loop it uses there (the whole-step form would hold 65536 values per program).
    targets = _targets(cb, seed=int(bits * 10))
    ref = encode_tiles(targets, bits, cb, backend="torch")
    states = triton_kernels.viterbi.viterbi_encode_triton(targets.to(device), bits, int(cb),
                                                          vector_a=device == "cpu").cpu()
    assert is_tail_biting(states, bits).all()
    assert torch.equal(states, ref.states)


def test_loop_form_run_on_gpus_chooses_the_reference_states(triton_kernels, device):
    # The GPU's form (a per-thread loop over predecessors, blocks of outputs); 1 bit keeps the
    # loop short, two blocks per step exercise the block loop.
    targets = _targets(Codebook.MCG, seed=5)
    ref = encode_tiles(targets, 1, Codebook.MCG, backend="torch")
    states = triton_kernels.viterbi.viterbi_encode_triton(targets.to(device), 1, int(Codebook.MCG), vector_a=False,
                                                          outputs_per_block=16384).cpu()
    assert torch.equal(states, ref.states)


def test_encode_tiles_dispatch(triton_kernels):
    targets = _targets(Codebook.MCG, seed=2)
    with pytest.raises(ValueError, match="backend 'cuda'"):
        encode_tiles(targets, 4, Codebook.MCG, backend="cuda")
    with pytest.raises(ValueError, match="unsupported bits"):
        encode_tiles(targets, 4.25, Codebook.MCG, backend="triton")
    # auto: Triton on CUDA tensors only (on a CPU the interpreter would take seconds per tile)
    assert not _use_triton(targets, "auto") and _use_triton(targets, "triton")
