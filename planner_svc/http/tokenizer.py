"""Text in and out: the model directory's `tokenizer.json` loaded with the `tokenizers` library
(offline; `slos-serve make-model` writes one), plus incremental detokenization for streaming.

Chat messages are rendered with a simplified stand-in template (`render_chat`): one
`<|role|>\\ncontent\\n` block per message and an open `<|assistant|>\\n` block. It does not run a
model's own Jinja chat template; the random-weight models of this project have none.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the `tokenizers` library is needed only when a model directory is given
    from tokenizers import Tokenizer

TOKENIZER_FILE = "tokenizer.json"
REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


class PromptTooLong(ValueError):
    """A text with more tokens than allowed; `num_tokens` says how many."""

    def __init__(self, num_tokens: int) -> None:
        super().__init__(f"{num_tokens} tokens")
        self.num_tokens = num_tokens


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus what the server needs to know about the model."""

    def __init__(
        self, tokenizer: Tokenizer, max_model_len: int | None = None, name: str = "tokenizer"
    ) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.name = name

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> TextTokenizer:
        """Load `DIR/tokenizer.json`; the context length comes from `DIR/config.json`
        (max_position_embeddings) or `DIR/tokenizer_config.json` (model_max_length) if present."""
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError(
                "--model-dir needs the `tokenizers` library: "
                "pip install 'slos-serve[torch]' (or just tokenizers)"
            ) from None
        model_dir = Path(model_dir)
        path = model_dir / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (make a model with `slos-serve make-model`)")
        return cls(Tokenizer.from_file(str(path)), _max_model_len(model_dir), model_dir.name)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes of text one token covers (an upper bound: the longest entry of
        the vocabulary, in UTF-8). A text of more than `n * max_token_bytes` characters has more
        than n tokens, assuming the normalizer deletes no characters (ours deletes none)."""
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        return max((len(token.encode()) for token in vocab), default=1)

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """Token ids of `text`; `PromptTooLong` when there are more than `max_tokens`. Through
        `encode_batch`, which releases the GIL while it works, unlike `encode`: a long prompt
        tokenized in a worker thread then does not stall the server's event loop. The length is
        checked before the ids become a Python list (~50 ms with the GIL held for 650k ids)."""
        encoding = self.tokenizer.encode_batch([text], add_special_tokens=False)[0]
        if max_tokens is not None and len(encoding) > max_tokens:
            raise PromptTooLong(len(encoding))
        return encoding.ids

    def decode(self, token_ids: list[int]) -> str:
        """Text of `token_ids`; special tokens (EOS) and ids outside the vocabulary are skipped."""
        known = [t for t in token_ids if 0 <= t < self.vocab_size]
        return self.tokenizer.decode(known, skip_special_tokens=True)

    def render_chat(self, messages: list[tuple[str, str]]) -> str:
        """Simplified stand-in chat template (see the module docstring)."""
        blocks = [f"<|{role}|>\n{content}\n" for role, content in messages]
        return "".join(blocks) + "<|assistant|>\n"


def _max_model_len(model_dir: Path) -> int | None:
    for name, key in (
        ("config.json", "max_position_embeddings"),
        ("tokenizer_config.json", "model_max_length"),
    ):
        path = model_dir / name
        if path.is_file():
            try:
                value = json.loads(path.read_text()).get(key)
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(value, int) and value > 1:
                return value
    return None


@dataclass
class IncrementalDetokenizer:
    """Text deltas from a growing list of token ids.

    Decoding token by token breaks multi-byte characters and merges that depend on neighbours, so
    each delta is the difference between the decoding of a short window ending at the new ids and
    the same window without them: `decode(ids[prefix:]) - decode(ids[prefix:read])`. A delta that
    ends in U+FFFD (an incomplete UTF-8 sequence) is held back until the next ids complete it.
    Concatenated deltas equal `decode(all ids)` for byte-level tokenizers (tested).
    """

    tokenizer: TextTokenizer
    token_ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0  # start of the context window
    read_offset: int = 0  # ids up to here have been turned into text

    def add(self, new_ids: list[int]) -> str:
        self.token_ids.extend(new_ids)
        return self._delta(final=False)

    def flush(self) -> str:
        """What is left at the end (an incomplete character stays as U+FFFD)."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        if self.read_offset >= len(self.token_ids):
            return ""
        prefix_text = self.tokenizer.decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self.tokenizer.decode(self.token_ids[self.prefix_offset :])
        if not final and (
            len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR)
        ):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return full_text[len(prefix_text) :]
