"""Simple text generation without a KV cache.

Each step re-runs the whole sequence: correct for any model, quadratic in
length, meant for small models and as the baseline the cached generator is
checked against.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .errors import InvalidArgumentError


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> int:
    """Greedy when ``temperature == 0``, otherwise softmax sampling over the top-k logits."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def generate_uncached(
    model,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
) -> Iterator[str]:
    """Yield decoded text pieces as tokens are generated; stops at an EOS token."""
    if max_new_tokens < 0:
        raise InvalidArgumentError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise InvalidArgumentError(f"temperature must be >= 0, got {temperature}")
    tok = model.tokenizer
    ids = tok.encode(prompt)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    new: list[int] = []
    emitted = ""
    for _ in range(max_new_tokens):
        logits = model.forward(torch.tensor(ids + new))[-1]
        token = sample_next(logits, temperature, top_k, generator)
        if token in tok.eos_token_ids:
            break
        new.append(token)
        text = tok.decode(new)
        # Hold back text ending in an incomplete UTF-8 sequence (shown as U+FFFD).
        if not text.endswith("\ufffd") and len(text) > len(emitted):
            yield text[len(emitted):]
            emitted = text
    text = tok.decode(new)
    if len(text) > len(emitted):
        yield text[len(emitted):]
