"""Streaming text out of a token stream: UTF-8-safe deltas and stop-string matching.

A BPE token may hold part of a multi-byte character (an emoji is often split over 2-4 tokens),
so decoding token by token would print replacement characters. :class:`IncrementalDetokenizer`
buffers incomplete UTF-8 sequences and only emits whole code points. :class:`StopMatcher` holds
back text that might be the beginning of a caller's stop string, so a stop string never leaks
into the stream, and cuts the text right before it when it appears.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence


class IncrementalDetokenizer:
    """Token ids in, text deltas out; never half a code point."""

    def __init__(self, token_bytes: Callable[[int], bytes]):
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Text completed by this token (may be empty while a character is incomplete)."""
        return self._decoder.decode(self._token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is left at the end of the stream (an incomplete tail becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Cut a text stream before the first caller-given stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        """Text safe to emit now. After a stop string is seen, ``stopped`` is True and nothing more is emitted."""
        if self.stopped:
            return ""
        if not self.stops:
            return delta
        text = self._held + delta
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            return text[:cut]
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """Release held-back text when the stream ends without a stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
