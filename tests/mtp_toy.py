"""A test-only MTP model: a real trunk (any loaded Llama-class model) with toy draft layers.

Each draft depth is a copy of the trunk's last decoder layer with its own cache and a fixed
random projection of ``[norm(embed(next token)), norm(hidden)]`` in front, the DeepSeek-V3 MTP
shape. Its drafts are poor but deterministic, and its layers keep real attention caches, so
it exercises everything the generator must get right for MTP (cache catch-up after accepted
and rejected drafts, chaining depths) independently of any one family's adapter.
``uncached_drafts`` recomputes the drafts from scratch for a verified token sequence: the
oracle for what the cached drafter must propose.
"""

from __future__ import annotations

import copy

import torch

from exl3_triton.arch.base import CausalLM
from exl3_triton.arch.blocks.norm import RMSNorm


class ToyMtpLM(CausalLM):
    verify_as_decode_rows = True  # the trunk's layers qualify; draft layers run over spans anyway

    def __init__(self, trunk, depth: int, seed: int = 0):
        super().__init__(trunk.config, trunk.options)
        self.trunk = trunk
        hidden = trunk.config.hidden_size
        g = torch.Generator().manual_seed(seed)
        self.draft_layers = torch.nn.ModuleList()
        self.projections = []
        for d in range(depth):
            layer = copy.deepcopy(trunk.layers[-1])
            layer.self_attn.layer_idx = len(trunk.layers) + d  # its own cache, after the trunk's
            self.draft_layers.append(layer)
            # mostly the hidden state: the drafts then correlate with the trunk's predictions
            proj = torch.cat([0.3 * torch.randn(hidden, hidden, generator=g) / hidden ** 0.5,
                              torch.eye(hidden)], dim=0)
            self.projections.append(proj.to(device=trunk.options.device, dtype=trunk.options.dtype))
        self.norm = RMSNorm(None, 1e-6)

    @property
    def vocab_size(self) -> int:
        return self.trunk.vocab_size

    @property
    def mtp_depth(self) -> int:
        return len(self.draft_layers)

    def cache_spec(self):
        specs = self.trunk.cache_spec()
        return specs + [specs[-1]] * self.mtp_depth

    def forward(self, input_ids, positions=None):
        return self.trunk.forward(input_ids, positions)

    def forward_batch(self, input_ids, batch, logits_rows=None, return_hidden=False):
        return self.trunk.forward_batch(input_ids, batch, logits_rows, return_hidden=return_hidden)

    def _mix(self, depth, hidden, next_ids):
        proj = self.projections[depth - 1]
        x = torch.cat([self.norm(self.trunk.embed(next_ids)).to(proj.dtype), self.norm(hidden).to(proj.dtype)], -1)
        return (x @ proj).to(hidden.dtype)  # the trunk's residual dtype (fp32 in Gemma 4)

    def mtp_forward(self, depth, hidden, next_ids, batch, logits_rows=None):
        x = self.draft_layers[depth - 1](self._mix(depth, hidden, next_ids), batch.positions, batch)
        rows = x if logits_rows is None else x[logits_rows]
        return self.trunk.head(rows), x

    def uncached_drafts(self, tokens: list[int], num: int) -> list[int]:
        """The drafts for the position after ``tokens`` (the last is the newest verified token),
        computed without any cache: full trunk pass, then each depth over all positions."""
        ids = torch.tensor(tokens)
        n = len(tokens)
        x = self.trunk.embed(ids)[None]
        positions = torch.arange(n)[None]
        for layer in self.trunk.layers:
            x = layer(x, positions)
        hidden = x[0][: n - 1]  # trunk rows whose next token is known
        seq = list(tokens)
        drafts = []
        for d in range(1, num + 1):
            count = hidden.shape[0]
            nxt = torch.tensor(seq[d:d + count])
            h = self.draft_layers[d - 1](self._mix(d, hidden, nxt)[None], positions[:, :count])[0]
            drafts.append(int(self.trunk.head(h[-1:]).argmax()))
            seq.append(drafts[-1])
            hidden = h
        return drafts

    def uncached_teacher_forced_acceptance(self, tokens: list[int]) -> list[float]:
        """Per depth: how often the depth's prediction from the true text equals the trunk's
        greedy prediction for the same position, all computed without a cache."""
        ids = torch.tensor(tokens)
        n = len(tokens)
        positions = torch.arange(n)[None]
        x = self.trunk.embed(ids)[None]
        for layer in self.trunk.layers:
            x = layer(x, positions)
        target = self.trunk.head(x[0]).argmax(-1)
        hidden, rates = x[0], []
        for d in range(1, self.mtp_depth + 1):
            count = n - d
            h = self.draft_layers[d - 1](self._mix(d, hidden[:count], ids[d:])[None], positions[:, :count])[0]
            predicted = self.trunk.head(h[: count - 1]).argmax(-1)
            rates.append(float((predicted == target[d:d + count - 1]).float().mean()))
            hidden = h
        return rates
