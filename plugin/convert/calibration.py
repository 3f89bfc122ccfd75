"""Calibration token ids, generated locally (no downloads).

The reference converter mixes bundled text corpora with 20% uniformly random
tokens (exl3-format.md 6.8). We bundle a short text written for this package
(public domain, ``calibration_text.txt``) and build ``rows x cols`` token ids:

* about 60% of the rows are the text, tokenized with the model's own
  tokenizer and read from varying offsets (wrapping round), so that the
  Hessians see real language statistics;
* about 20% are uniformly random ids over the vocabulary, so every embedding
  row and rare direction gets some weight;
* about 20% are structured sequences (repeated short patterns, counting runs
  of ids), which exercise attention over repeats.

Without a tokenizer the text rows become random rows. The ids depend only on
the seed, so a resumed conversion sees the same data.
"""

from __future__ import annotations

from pathlib import Path

import torch

TEXT_FILE = Path(__file__).with_name("calibration_text.txt")


def calibration_text() -> str:
    return TEXT_FILE.read_text(encoding="utf-8")


def _text_rows(tokens: list[int], rows: int, cols: int, generator: torch.Generator) -> list[torch.Tensor]:
    ring = torch.tensor(tokens, dtype=torch.long)
    out = []
    for _ in range(rows):
        start = int(torch.randint(0, ring.numel(), (1,), generator=generator))
        idx = (start + torch.arange(cols)) % ring.numel()
        out.append(ring[idx])
    return out


def _structured_rows(vocab: int, rows: int, cols: int, generator: torch.Generator) -> list[torch.Tensor]:
    out = []
    for r in range(rows):
        if r % 2 == 0:  # a short random pattern, repeated
            period = int(torch.randint(2, 17, (1,), generator=generator))
            pattern = torch.randint(0, vocab, (period,), generator=generator)
            out.append(pattern[torch.arange(cols) % period])
        else:  # runs of consecutive ids from a random start
            start = int(torch.randint(0, vocab, (1,), generator=generator))
            out.append((start + torch.arange(cols) // 4) % vocab)
    return out


def calibration_ids(rows: int, cols: int, vocab_size: int, tokenizer=None, *, seed: int = 0) -> torch.Tensor:
    """Token ids ``[rows, cols]`` (long) for calibration."""
    if rows < 1 or cols < 1:
        raise ValueError(f"calibration needs at least one row and one column, got {rows} x {cols}")
    g = torch.Generator().manual_seed(seed)
    n_random = max(1, rows // 5) if rows >= 3 else 0
    n_structured = max(1, rows // 5) if rows >= 3 else 0
    n_text = rows - n_random - n_structured
    tokens = None
    if tokenizer is not None:
        tokens = [t for t in tokenizer.encode(calibration_text(), add_bos=False) if 0 <= t < vocab_size]
    parts = []
    if tokens and len(tokens) > 1:
        parts += _text_rows(tokens, n_text, cols, g)
    else:
        n_random += n_text
    parts += [torch.randint(0, vocab_size, (cols,), generator=g) for _ in range(n_random)]
    parts += _structured_rows(vocab_size, n_structured, cols, g)
    return torch.stack(parts)
