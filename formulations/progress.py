"""A request's token progress, owned in one place (the planner's `RequestState`, the engines'
sequences and the adapter's tally all derive from these three counts).

Phase-free token view: a request has `num_tokens` known tokens (prompt plus the output generated so
far), of which `num_computed_tokens` are in the KV cache. A step that brings the computed count up
to `num_tokens` samples the next output token, so a decoding request has exactly one pending token.
Prefill, chunked prefill, recompute after preemption and decode are all "compute the pending
tokens". KV memory is counted in blocks of `block_size` tokens: ceil(tokens / block_size).
"""

from __future__ import annotations


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    """KV blocks that hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


class TokenProgress:
    """Mixin for an object with `num_prompt_tokens`, `num_computed_tokens` and
    `num_generated_tokens`: the derived quantities every part of the system uses."""

    __slots__ = ()
    num_prompt_tokens: int
    num_computed_tokens: int
    num_generated_tokens: int

    @property
    def num_tokens(self) -> int:
        """Known tokens: the prompt and the output so far."""
        return self.num_prompt_tokens + self.num_generated_tokens

    @property
    def num_pending_tokens(self) -> int:
        """Tokens to compute before the next output token is sampled (1 while decoding)."""
        return self.num_prompt_tokens + self.num_generated_tokens - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """Output started and only the last sampled token is pending."""
        generated = self.num_generated_tokens
        return generated > 0 and self.num_prompt_tokens + generated - self.num_computed_tokens == 1

    def num_blocks_after(self, num_new_tokens: int, block_size: int) -> int:
        """KV blocks held after computing `num_new_tokens` more tokens."""
        return -(-(self.num_computed_tokens + num_new_tokens) // block_size)  # num_blocks_for
