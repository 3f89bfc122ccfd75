"""DeepSeek-V4's DSpark block drafter (the newer checkpoints' ``mtp.*`` namespace).

The math follows the reference that ships in the checkpoint (``hf/inference/model.py``), as
ExLlamaV3 runs it (``architecture/deepseek_v4_mtp.py``, ``modules/arch_specific/dspark.py``):

* **main-kv**: at every trunk position the stream means ``mean_n X_n`` after the layers
  ``dspark_target_layer_ids`` are concatenated, projected ``main_x = main_norm(main_proj(taps))``,
  and each drafter block ``i`` keeps ``RoPE(kv_norm_i(wkv_i(main_x)))`` at that position: the
  same K = V row a trunk sliding layer would keep, from a different input.
* **draft block**: ``[seed, noise x (block - 1)]`` at positions ``p0 .. p0 + block - 1``, where
  ``p0`` is the number of cached (verified) positions and the seed the token sampled last. The
  embedding goes into the 4 mHC streams and through the drafter blocks (compressor-less V4
  blocks, bias-routed MoE). Attention is **non-causal**: every block query sees the same keys,
  the last ``min(window, p0)`` main-kv rows plus the block's own rows, in one softmax with the
  per-head sink, de-rotated and through the grouped output like the trunk's.
* **output**: the last block's ``hc_head`` collapse ``y`` (pre-norm), ``norm``, the trunk's head.
* **markov head**: drafting is a greedy chain ``t_0 = seed``, ``t_{i+1} = argmax(logits_i +
  markov_w2 markov_w1[t_i])`` (a low-rank bigram bias from the token before).
* **confidence head**: ``c_i = sigmoid(proj([y_i, markov_w1[t_i]]))``; the draft is the longest
  prefix ``t_1..t_L`` whose positions ``0..L-1`` all reach the threshold. ExLlamaV3 takes the
  batch maximum of ``L``; here each sequence keeps its own (the generator drafts per job).

Decode state (the runtime's rule: indexed by position): one ring per drafter block holding the
main-kv row of each trunk position. The trunk writes it in its own forward for every row it
runs, like its KV rings; rows of rejected drafts sit at positions the cache forgets and are
rewritten, from the verified token, before anything reads them. The draft block itself writes
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..cache_spec import LayerCacheSpec, PagedTensorSpec
from .linear import Linear
from .mhc import HyperHead, expand
from .norm import RMSNorm
from .rope_interleaved import rope_angles, rotate_tail_interleaved


@dataclass(frozen=True)
class DSparkConfig:
    """Config keys ``dspark_block_size`` (tokens per draft block, the seed included: drafts per step),
    ``dspark_noise_token_id``, ``dspark_markov_rank``, ``dspark_target_layer_ids``."""

    block_size: int
    noise_token_id: int
    markov_rank: int
    target_layers: tuple[int, ...]


@dataclass
class BlockDraft:
    """Per sequence: the greedy draft ``tokens [B, block]``, each block position's confidence ``[B, block]``
    and the logits the chain took its argmax of (markov bias included) ``[B, block, vocab]``."""

    tokens: torch.Tensor
    confidence: torch.Tensor
    logits: torch.Tensor

    def lengths(self, threshold: float) -> list[int]:
        """Drafts to propose per sequence: the longest prefix of positions at or above ``threshold``."""
        keep = (self.confidence >= threshold).to(torch.int32)
        return torch.cumprod(keep, dim=1).sum(dim=1).tolist()


class DSparkDrafter(nn.Module):
    """``blocks``: DeepSeek-V4 decoder layers (``attn`` a sliding ``DSV4Attention``, ``sites``) with
    the drafter's weights. ``first_entry``: the cache entry of block 0's main-kv ring (the others follow)."""

    def __init__(self, cfg: DSparkConfig, *, main_proj: Linear, main_norm: RMSNorm, blocks: list[nn.Module],
                 hc_head: HyperHead, norm: RMSNorm, markov_w1: torch.Tensor, markov_w2: torch.Tensor,
                 confidence_weight: torch.Tensor, confidence_bias: torch.Tensor | None, hc_mult: int,
                 window: int, dtype: torch.dtype, first_entry: int):
        super().__init__()
        self.cfg, self.hc_mult, self.window, self.dtype = cfg, hc_mult, window, dtype
        self.main_proj, self.main_norm = main_proj, main_norm
        self.blocks = nn.ModuleList(blocks)
        self.hc_head, self.norm = hc_head, norm
        # unquantized in the reference: a bigram table [vocab, rank] read by token, its output [vocab, rank]
        self.register_buffer("markov_w1", markov_w1.to(dtype))
        self.register_buffer("markov_w2", markov_w2.to(dtype))
        # a [1, hidden + rank] scoring row: fp32, like the routers
        self.register_buffer("confidence_weight", confidence_weight.float())
        self.register_buffer("confidence_bias", None if confidence_bias is None else confidence_bias.float())
        self.first_entry = first_entry

    @property
    def block_size(self) -> int:
        return self.cfg.block_size

    @property
    def device(self) -> torch.device:
        return self.markov_w1.device

    def cache_specs(self) -> list[LayerCacheSpec]:
        """One ring per block: the main-kv row of each position (the last ``window`` are read)."""
        return [LayerCacheSpec(paged=(PagedTensorSpec("main_kv", (b.attn.head_dim,), self.dtype),),
                               window=self.window, device=self.device, ring=True) for b in self.blocks]

    # ------------------------------------------------------------- main-kv (run inside the trunk's forward)

    def main_kv_rows(self, taps: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
        """``taps [T, n_taps * hidden]`` (stream means) at ``positions [T]`` -> each block's main-kv rows ``[T, head_dim]``."""
        main_x = self.main_norm(self.main_proj(taps.to(self.dtype))).to(self.dtype)
        out = []
        for block in self.blocks:
            cos, sin = rope_angles(positions, block.attn.inv_freq)
            out.append(block.attn.roped_kv(main_x, cos, sin))
        return out

    def write_main_kv(self, taps: torch.Tensor, batch) -> None:
        """Store the main-kv rows of the batch's rows in the rings, where the trunk's own rings put them
        (``batch.ring_slot_mapping``; -1: a later row of the same chunk takes that ring entry)."""
        dev = self.device
        slots = batch.ring_slot_mapping.to(dev)
        rows = self.main_kv_rows(taps.to(dev), batch.positions.to(dev))
        for i, kv in enumerate(rows):
            flat = batch.cache.paged[self.first_entry + i]["main_kv"]
            flat = flat.view(-1, flat.shape[-1])
            if batch.is_decode:  # one row per sequence: every row is kept (and no host sync in a captured step)
                flat[slots] = kv.to(flat.dtype)
            else:
                keep = slots >= 0
                flat[slots[keep]] = kv[keep].to(flat.dtype)

    # ------------------------------------------------------------- the draft block

    def history(self, cache, starts: torch.Tensor, ring_bases: torch.Tensor, entry: int):
        """Main-kv rows of positions ``start - window .. start - 1`` per sequence ``[B, window, head_dim]``
        and which exist ``[B, window]`` (``ring_bases``: flat index of each sequence's ring, position 0)."""
        ring = cache.paged[self.first_entry + entry]["main_kv"]
        ring_size = cache.ring_pages * cache.page_size
        pos = starts[:, None] - self.window + torch.arange(self.window, device=starts.device)
        idx = ring_bases[:, None] + pos % ring_size
        return ring.view(-1, ring.shape[-1])[idx], pos >= 0

    @staticmethod
    def attend(attn, h: torch.Tensor, positions: torch.Tensor, history: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """One block's attention: queries ``h [B, S, hidden]`` (normed) at ``positions [B, S]`` over the
        main-kv ``history [B, H, head_dim]`` and their own rows; ``mask [B, S, H + S]``: what each sees."""
        b, s = positions.shape
        _, q, rows, (cos, sin) = attn._project(h, positions)
        keys = torch.cat([history.float(), rows["kv"].float()], dim=1)
        out = attn._attend(q.float(), keys, mask)
        out = rotate_tail_interleaved(out, cos, -sin)  # V = K carries the rope: undo it at the query
        return attn.output(out.to(h.dtype).reshape(b * s, -1)).view(b, s, -1)

    def calibration_forward(self, k: int, x: torch.Tensor, ids: torch.Tensor, main_x: torch.Tensor) -> torch.Tensor:
        """Block ``k`` over whole calibration sequences cut into draft blocks (the converter's input for
        its linears): ``x [B, T, N, D]`` streams of the block inputs ``ids [B, T]`` (``block_ids``),
        ``main_x [B, T, D]`` each position's projected taps. Block ``j`` (positions ``jS .. jS + S - 1``)
        sees the main-kv rows of the ``window`` positions before ``jS`` and its own rows, as when drafting."""
        block, (b, t) = self.blocks[k], ids.shape
        positions = torch.arange(t, device=x.device).expand(b, t)
        cos, sin = rope_angles(positions.reshape(-1), block.attn.inv_freq)
        main_kv = block.attn.roped_kv(main_x.reshape(b * t, -1).to(self.dtype), cos, sin).view(b, t, -1)
        p0 = positions[:, :, None] // self.block_size * self.block_size  # [B, T, 1] each query's block start
        kp = positions[:, None, :]  # [B, 1, T]
        mask = torch.cat([(kp < p0) & (kp >= p0 - self.window), kp // self.block_size * self.block_size == p0], dim=2)

        def attend(y):
            return self.attend(block.attn, y.view(b, t, -1), positions, main_kv, mask).reshape(b * t, -1)

        return block.sites(x.reshape(b * t, *x.shape[2:]), attend, ids.reshape(-1)).view(x.shape)

    def block_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Calibration block inputs of token sequences ``ids [B, T]``: each block's first token, then noise."""
        pos = torch.arange(ids.shape[-1], device=ids.device)
        return torch.where(pos % self.block_size == 0, ids, torch.full_like(ids, self.cfg.noise_token_id))

    def draft(self, seeds: torch.Tensor, starts: torch.Tensor, ring_bases: torch.Tensor, cache, embed,
              lm_head) -> BlockDraft:
        """Draft for ``B`` sequences: ``seeds [B]`` (the last sampled tokens, at positions ``starts [B]``,
        the sequences' cached lengths). ``embed``: token ids -> embeddings ``[R, hidden]`` (the trunk's);
        ``lm_head``: the trunk's head on normed rows."""
        dev, s = self.device, self.block_size
        seeds, starts, ring_bases = seeds.to(dev), starts.to(dev), ring_bases.to(dev)
        b = seeds.shape[0]
        ids = torch.cat([seeds[:, None], torch.full((b, s - 1), self.cfg.noise_token_id, device=dev,
                                                     dtype=seeds.dtype)], dim=1)
        positions = starts[:, None] + torch.arange(s, device=dev)
        x = expand(embed(ids.reshape(-1)).to(dev), self.hc_mult)  # [B S, N, D]
        for i, block in enumerate(self.blocks):
            hist, visible = self.history(cache, starts, ring_bases, i)
            mask = torch.cat([visible, torch.ones(b, s, dtype=torch.bool, device=dev)], dim=1)[:, None].expand(b, s, -1)

            def attend(y, block=block, hist=hist, mask=mask):
                return self.attend(block.attn, y.view(b, s, -1), positions, hist, mask).reshape(b * s, -1)

            x = block.sites(x, attend, ids.reshape(-1))
        y = self.hc_head(x)  # [B S, D] fp32, before the norm: the confidence head reads it
        logits = lm_head(self.norm(y).to(self.dtype)).float().view(b, s, -1)
        token, tokens, embs, biased = seeds, [], [], []
        for i in range(s):  # the markov bias depends on the previous draft: a sequential greedy chain
            emb = self.markov_w1[token]
            embs.append(emb)
            biased.append(logits[:, i] + (emb @ self.markov_w2.T).float())
            token = torch.argmax(biased[-1], dim=-1)
            tokens.append(token)
        feats = torch.cat([y.view(b, s, -1), torch.stack(embs, dim=1).float()], dim=-1)
        score = feats @ self.confidence_weight.T
        if self.confidence_bias is not None:
            score = score + self.confidence_bias
        return BlockDraft(torch.stack(tokens, dim=1), torch.sigmoid(score[..., 0]), torch.stack(biased, dim=1))
