"""OpenAI response bodies and stream chunks for completions and chat completions.

Extensions beside the standard fields (clients that do not know them ignore them):
- `choices[i].token_ids`: the output token ids of the body or of the chunk (how many tokens a chunk
  carries: an engine step with speculation may produce several);
- `slo`: the planner's verdict and resolved targets, in the body and the first stream chunk:
  `{"verdict": "admitted" | "best_effort", "slo_class", "ttft_ms", "tpot_ms", "replica_id"}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wire import protocol as P


@dataclass(frozen=True)
class ResponseHead:
    """What every body and chunk of one response shares."""

    response_id: str
    created_s: int
    model: str
    chat: bool

    def completion(
        self,
        text: str,
        token_ids: list[int],
        finish_reason: str,
        usage: dict[str, int],
        slo: dict[str, Any],
    ) -> dict[str, Any]:
        content = (
            {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        )
        choice = _choice(content, finish_reason, token_ids)
        return {**self._common(chunk=False), "choices": [choice], "usage": usage, "slo": slo}

    def chunk(
        self,
        text: str,
        token_ids: list[int],
        finish_reason: str | None = None,
        first: bool = False,
        slo: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = (
                {"role": "assistant", "content": text}
                if first
                else ({"content": text} if text or finish_reason is None else {})
            )
            content: dict[str, Any] = {"delta": delta}
        else:
            content = {"text": text}
        choice = _choice(content, finish_reason, token_ids)
        body = {**self._common(chunk=True), "choices": [choice]}
        if slo is not None:
            body["slo"] = slo
        return body

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._common(chunk=True), "choices": [], "usage": usage}

    def _common(self, chunk: bool) -> dict[str, Any]:
        if self.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            kind = "text_completion"
        return {
            "id": self.response_id,
            "object": kind,
            "created": self.created_s,
            "model": self.model,
        }


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
    }


def slo_info(verdict: P.VerdictMsg, slo_class: str) -> dict[str, Any]:
    return {
        "verdict": verdict.verdict,
        "slo_class": slo_class,
        "ttft_ms": verdict.ttft_slo_s * 1e3,
        "tpot_ms": verdict.tpot_s * 1e3,
        "replica_id": verdict.replica_id,
    }


def _choice(content: dict[str, Any], finish_reason: str | None, token_ids: list[int]) -> dict:
    """One OpenAI choice: index 0, the content (`message`, `delta` or `text`), no logprobs."""
    return {
        "index": 0,
        **content,
        "logprobs": None,
        "finish_reason": finish_reason,
        "token_ids": token_ids,
    }
