"""Token ids -> text for the user API: incremental detokenization and stop strings.

Both are pure and work a token at a time, so streamed and whole answers come from the same code and their
texts are equal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_CONTEXT = 5  # prompt ids decoded with the output, so a first token's leading space comes out as the model meant


class IncrementalDetokenizer:
    """Text for each new token that is final: never half a UTF-8 character (a byte-level token may hold a
    fragment of one, which decodes to U+FFFD until the rest arrives).

    Decodes a short window [prefix, now) and returns what it adds past [prefix, read), so each step costs
    a few tokens' decode whatever the output length (the scheme of Hugging Face's text-generation-inference).
    """

    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: Sequence[int] = ()):
        self.decode = decode
        self.ids = list(prompt_ids[-_CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """What is left at the end (an unfinished character comes out as U+FFFD, as a plain decode gives it)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self.decode(self.ids[self.prefix:self.read])
        after = self.decode(self.ids[self.prefix:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]


class StopMatcher:
    """Holds back text that may be the start of a stop string; cuts the output where one appears.

    `feed(text)` returns (text safe to send now, stopped); once stopped, the stop string and everything after
    it are never returned. `flush()` gives what was held back when the generation ends without a stop.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out, True
        keep = self._partial_suffix()
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _partial_suffix(self) -> int:
        """Length of the longest end of `pending` that begins some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:n]):
                    best = n
                    break
        return best
