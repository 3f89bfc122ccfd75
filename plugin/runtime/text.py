"""Streaming text: incremental detokenisation and stop strings.

``IncrementalDecoder`` turns token ids into text pieces as they arrive. Decoding
a growing list over and over is quadratic, and decoding tokens one at a time
breaks multi-byte characters and word-boundary spaces, so it decodes a short
window (a few tokens of context plus the new ones) and emits only the part not
emitted before; a window whose text ends in U+FFFD (an incomplete UTF-8
sequence) is held back until the next token completes it.

``StopStringMatcher`` finds stop strings in the streamed text, also when one is
split across tokens: text that could be the start of a stop string is held back
until it is known not to be.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 6


class IncrementalDecoder:
    def __init__(self, decode, prompt_ids: list[int] | None = None):
        """``decode(ids) -> str``; the last prompt tokens give the first new token its context."""
        self._decode = decode
        self.ids: list[int] = list((prompt_ids or [])[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        """Text that ``token_id`` completes ("" while a character is still incomplete)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            delta = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """At the end of generation: whatever is still held back (an incomplete character stays as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):] if len(full) > len(prefix) else ""


class StopStringMatcher:
    def __init__(self, stop_strings: list[str] | tuple[str, ...]):
        self.stops = [s for s in stop_strings if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Returns (text safe to emit, the stop string matched or None). After a match, stop."""
        if not self.stops:
            return text, None
        self.pending += text
        first = None
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0 and (first is None or i < first[0]):
                first = (i, s)
        if first is not None:
            out = self.pending[:first[0]]
            self.pending = ""
            return out, first[1]
        hold = 0
        for s in self.stops:  # longest tail of pending that starts some stop string
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out, None

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
