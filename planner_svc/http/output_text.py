"""The output of one request as text: detokenized incrementally, cut at the first stop string.

While streaming, the last `len(longest stop string) - 1` characters are held back, since they may be
the start of a stop string that the next tokens complete; a stop string itself is never sent.
Without a tokenizer (token-id clients, simulated engines) the text stays empty and the token ids
are the output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from planner_svc.http.tokenizer import IncrementalDetokenizer, TextTokenizer


@dataclass
class OutputText:
    tokenizer: TextTokenizer | None
    stop: tuple[str, ...] = ()
    text: str = ""  # detokenized so far (up to and excluding a stop string)
    num_sent_chars: int = 0
    stopped: bool = False  # a stop string was found
    _detokenizer: IncrementalDetokenizer | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.tokenizer is not None:
            self._detokenizer = IncrementalDetokenizer(self.tokenizer)

    @property
    def _holdback_chars(self) -> int:
        return max((len(s) for s in self.stop), default=1) - 1

    def add(self, token_ids: list[int]) -> str:
        """Append new tokens; returns the text that may be sent now."""
        if self._detokenizer is None or self.stopped:
            return ""
        self._append(self._detokenizer.add(token_ids))
        limit = len(self.text) if self.stopped else len(self.text) - self._holdback_chars
        return self._take(limit)

    def finish(self) -> str:
        """The rest of the text, once no more tokens will come."""
        if self._detokenizer is not None and not self.stopped:
            self._append(self._detokenizer.flush())
        return self._take(len(self.text))

    def _append(self, delta: str) -> None:
        if not delta:
            return
        # A stop string may straddle the old text and the delta: search from where it could start.
        search_from = max(0, len(self.text) - self._holdback_chars)
        self.text += delta
        cut = min((i for s in self.stop if (i := self.text.find(s, search_from)) >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.stopped = True

    def _take(self, limit: int) -> str:
        if limit <= self.num_sent_chars:
            return ""
        chunk = self.text[self.num_sent_chars : limit]
        self.num_sent_chars = limit
        return chunk
