"""Layer placement over several devices."""

import json

import pytest
import torch

import exl3_triton
from exl3_triton.devices import GB, plan_layers, tensor_bytes_by_layer
from exl3_triton.checkpoint import Checkpoint
from exl3_triton.errors import InvalidArgumentError

from .conftest import rel_err
from .runtime_helpers import cached_logits

A, B = torch.device("cuda", 0), torch.device("cuda", 1)


def test_layers_fill_devices_in_order():
    plan = plan_layers([4 * GB] * 6, 1 * GB, 1 * GB, [10, 20], [A, B])
    # GPU 0: 1 GB embedding + two 4 GB layers = 9 of 10 GB; the rest and the head on GPU 1
    assert plan.layer_devices == (A, A, B, B, B, B) and plan.embed_device == A and plan.head_device == B


def test_head_moves_on_when_the_last_layer_device_is_full():
    plan = plan_layers([4 * GB] * 2, 0, 3 * GB, [8, 4], [A, B])
    assert plan.layer_devices == (A, A) and plan.head_device == B


@pytest.mark.parametrize("split", [[4, 4], [20, 0.5]])
def test_does_not_fit(split):
    with pytest.raises(InvalidArgumentError, match="does not fit"):
        plan_layers([4 * GB] * 6, 1 * GB, 1 * GB, split, [A, B])


def test_bad_split_values():
    with pytest.raises(InvalidArgumentError, match=">= 0"):
        plan_layers([GB], 0, 0, [-1, 4], [A, B])
    with pytest.raises(InvalidArgumentError, match="entries"):
        plan_layers([GB], 0, 0, [4], [A, B])


def test_bytes_by_layer_from_a_checkpoint(golden):
    ckpt = Checkpoint(golden / "exl3" / "llama_k4_mcg")
    layers, embed, other = tensor_bytes_by_layer(ckpt, 2)
    assert layers[0] == layers[1] > 0 and embed == 512 * 256 * 2
    assert sum(layers) + embed + other == ckpt.total_bytes()


def test_split_model_runs_like_the_whole_model(golden):
    """Two 'devices' (both CPU here: the mechanics, not the hardware) give the same logits."""
    src = golden / "exl3" / "llama_k4_mcg"
    whole = exl3_triton.load(src)
    layer0 = tensor_bytes_by_layer(Checkpoint(src), 2)[0][0]
    split = exl3_triton.load(src, gpu_split=[(layer0 + 300_000) / GB, 1], devices=["cpu", "cpu"])
    assert split.options.plan.layer_devices == (torch.device("cpu"),) * 2
    ids = json.loads((golden / "hf" / "llama_ids.json").read_text())[:30]
    torch.testing.assert_close(split.forward(torch.tensor(ids)), whole.forward(torch.tensor(ids)))
    assert rel_err(cached_logits(split, ids, chunks=[10]), whole.forward(torch.tensor(ids))) < 1e-5
