"""Streaming text of one generated sequence: whole characters only, stop strings cut out.

Tokens are byte sequences, and one character can straddle tokens (an emoji is often 2-4 byte-level
tokens), so text is released only once complete (the tokenizer's stream decoder does that). Stop
strings are matched on that text, across token boundaries: ``"\\n\\nQ:"`` may arrive as ``"\\n"``,
``"\\n"``, ``"Q"``, ``":"``. To never emit the beginning of a stop string that later completes, the
stream holds back the longest tail of the text that is a prefix of some stop string, and releases
it as soon as it can no longer become one (or the sequence ends for another reason).
"""

from __future__ import annotations


class TextStream:
    def __init__(self, decoder, stop: list[str] | tuple[str, ...] = ()):
        self.decoder = decoder  # tokenizer.stream_decoder(): push(id) -> str, flush() -> str
        self.stop = tuple(stop)
        self.text = ""  # everything decoded so far
        self.emitted = 0  # len of text already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; returns the text that is now safe to emit. Sets ``stopped`` on a match."""
        self.text += self.decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """The sequence ended (length or end-of-text): flush the decoder and emit what is left."""
        if self.stopped:
            return ""
        self.text += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop:
            hits = [i for i in (self.text.find(s, self.emitted) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                delta = self.text[self.emitted:cut]
                self.text = self.text[:cut]
                self.emitted = cut
                self.stopped = True
                return delta
        end = len(self.text)
        if self.stop and not final:
            end -= self._held_back()
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta

    def _held_back(self) -> int:
        """Length of the longest tail of the unemitted text that could start a stop string."""
        tail = self.text[self.emitted:]
        longest = min(len(tail), max(len(s) for s in self.stop) - 1)
        for k in range(longest, 0, -1):
            if any(s.startswith(tail[-k:]) for s in self.stop):
                return k
        return 0
