"""``CausalLM``: what every architecture adapter provides to the rest of the package."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..options import RuntimeOptions
from .batch import ForwardBatch, running
from .blocks.linear import Linear
from .cache_spec import LayerCacheSpec


class CausalLM(nn.Module):
    """Base class of the adapters.

    A subclass declares the ``architectures`` strings it serves (matched against
    ``config.json["architectures"][0]``), parses its config in
    ``config_from_checkpoint`` (rejecting unsupported values by key name), builds
    itself from a ``Checkpoint`` in ``from_checkpoint``, and runs ``forward``.
    Capabilities are class attributes so that they can be read without loading.
    """

    architectures: ClassVar[tuple[str, ...]] = ()
    has_mtp: ClassVar[bool] = False
    # True when, in a decode step (``batch.is_decode``), each row depends only on the cached state
    # of earlier positions and every layer stores all rows' state before any row reads it. Then
    # several consecutive tokens of one sequence (drafts being verified) can run as decode rows of
    # their own, each at its position over the sequence's pages, in captured CUDA graphs.
    verify_as_decode_rows: ClassVar[bool] = False

    def decode_context_buckets(self) -> tuple[int, ...]:
        """Ascending position bounds under which a layer runs a cheaper decode step (see
        ``ForwardBatch.context_bound``); the runner keys its CUDA graphs by the bucket a step falls in.
        None by default; asked for every step, so keep it cheap."""
        return ()

    def __init__(self, config, options: RuntimeOptions):
        super().__init__()
        self.config = config
        self.options = options

    @classmethod
    def config_from_checkpoint(cls, checkpoint: Checkpoint):
        raise NotImplementedError

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, options: RuntimeOptions, progress=None) -> "CausalLM":
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids [B, T]`` -> fp32 logits ``[B, T, vocab]`` over the whole sequence (no cache)."""
        raise NotImplementedError

    def cache_spec(self) -> list[LayerCacheSpec]:
        """The decode-time state of each layer, in layer order (the runtime allocates it)."""
        raise NotImplementedError

    def forward_batch(self, input_ids: torch.Tensor, batch: ForwardBatch,
                      logits_rows: torch.Tensor | None = None, return_hidden: bool = False):
        """Packed tokens ``input_ids [T]`` of several sequences, cached state in ``batch.cache``.

        Returns fp32 logits for the rows in ``logits_rows`` (default: every row): ``[N, vocab]``;
        with ``return_hidden`` also the final hidden state of every row, before the final norm
        (see the MTP contract below).
        """
        raise NotImplementedError

    # ---- MTP draft layers (families whose checkpoints ship them; used by the generator's "mtp" drafting)
    #
    # Contract (see plugin/runtime/drafting.py for how the generator drives it):
    # * ``mtp_depth``: how many chained draft layers are loaded (0: none).
    # * ``forward_batch(ids, batch, rows, return_hidden=True)`` returns ``(logits, hidden)``, where
    #   ``hidden [T, ...]`` is, for every row, the state that seeds depth 1 (e.g. after the mHC
    #   merge and before the final norm).
    # * ``mtp_forward(depth, hidden, next_ids, batch, rows)`` runs draft layer ``depth`` (1-based)
    #   over rows whose ``hidden`` is the previous depth's output (depth 1: the trunk's) at
    #   ``batch.positions``, and whose ``next_ids`` are the tokens one step ahead. It writes the draft
    #   layer's own cache at the batch's slots (its state is declared in ``cache_spec()`` after the
    #   trunk's layers and lives at the same positions) and returns ``(fp32 logits [rows, vocab],
    #   hidden [T, ...])``; that hidden seeds depth + 1.
    # Draft-layer state, like all decode state, must be indexed by position (pages or rings), so
    # that rejecting drafted tokens is just forgetting positions.

    @property
    def mtp_depth(self) -> int:
        return 0

    def mtp_forward(self, depth: int, hidden: torch.Tensor, next_ids: torch.Tensor, batch: ForwardBatch,
                    logits_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no MTP draft layers")

    # ---- block drafter (DeepSeek-V4 DSpark): one forward drafts a whole block of tokens
    #
    # * ``block_drafter``: None, or the drafter module; its ``block_size`` is the most drafts per step.
    # * ``forward_batch`` keeps the drafter's state current for every row it runs (per-position rows in
    #   the drafter's own ring entries of ``cache_spec()``, written like the trunk's KV rings), so
    #   rejected drafts are forgotten with their positions.
    # * ``draft_block(seeds, starts, ring_bases, cache)`` -> ``arch.blocks.dspark.BlockDraft`` (greedy
    #   tokens and per-position confidences) for sequences that cached ``starts`` positions and whose
    #   last sampled token is ``seeds``; ``ring_bases``: ``cache.ring_slot(seq.slot, 0)`` per sequence.

    @property
    def block_drafter(self):
        return None

    def draft_block(self, seeds: torch.Tensor, starts: torch.Tensor, ring_bases: torch.Tensor, cache):
        raise NotImplementedError(f"{type(self).__name__} has no block drafter")

    def linears(self) -> list[Linear]:
        return [m for m in self.modules() if isinstance(m, Linear)]

    @staticmethod
    def default_positions(input_ids: torch.Tensor) -> torch.Tensor:
        b, t = input_ids.shape
        return torch.arange(t, device=input_ids.device).expand(b, t)


class DecoderStackLM(CausalLM):
    """The common shape: embedding -> decoder layers -> final norm -> head.

    Its layers (GQA attention storing keys/values before attending, per-row MLP/MoE) qualify
    for ``verify_as_decode_rows``.

    Subclasses build the parts and may override ``embed`` (scaling, dtype of the
    residual stream) and ``head`` (softcapping). Each layer is called as
    ``layer(x, positions, batch)`` and runs on the device of its ``input_layernorm``
    (layers may be spread over GPUs).
    """

    verify_as_decode_rows = True

    def __init__(self, config, options: RuntimeOptions, embed_tokens: torch.Tensor, layers: list[nn.Module],
                 norm: nn.Module, lm_head: Linear):
        super().__init__(config, options)
        self.register_buffer("embed_tokens", embed_tokens)
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = lm_head

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens[input_ids.to(self.embed_tokens.device)]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x)).float()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:
            positions = self.default_positions(input_ids)
        x = self.embed(input_ids)
        for layer in self.layers:
            dev = layer.input_layernorm.weight.device
            x = layer(x.to(dev), positions.to(dev))
        return self.head(x.to(self.norm.weight.device))

    def forward_batch(self, input_ids: torch.Tensor, batch: ForwardBatch,
                      logits_rows: torch.Tensor | None = None, return_hidden: bool = False):
        with running(batch):
            x = self.embed(input_ids)
            for layer in self.layers:
                dev = layer.input_layernorm.weight.device
                on_dev = batch.on(dev)
                x = layer(x.to(dev), on_dev.positions, on_dev)
            head_dev = self.norm.weight.device
            hidden = x = x.to(head_dev)
            if logits_rows is not None:
                x = x[logits_rows.to(head_dev)]
            return (self.head(x), hidden) if return_hidden else self.head(x)
