"""Speculative verification: the draft proposed tokens d_1..d_s with distributions q_1..q_s; the
target, run on the same positions, gives p_1..p_{s+1}. Accept d_i with probability
min(1, p_i(d_i) / q_i(d_i)); at the first rejection draw from the residual
norm(max(0, p_i - q_i)) and stop; if all s are accepted draw a bonus token from p_{s+1}. The output
is then distributed exactly as sampling from the target alone (Leviathan et al. 2023, Chen et al.
2023). Under greedy sampling p and q are one-hot, so this reduces to: accept while d_i equals the
target's argmax, then emit the target's argmax — output identical to plain greedy decoding.
"""

from __future__ import annotations

import torch

from engine_adapters.torch_engine.model_runner import Chunk, ModelRunner
from engine_adapters.torch_engine.sampling import SamplingParams, draw, probabilities
from engine_adapters.torch_engine.sequence import Sequence


def verify(
    draft_tokens: list[int],
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
) -> tuple[list[int], int]:
    """-> (output tokens, number of draft tokens accepted); len(output) == accepted + 1.

    draft_probs: [s, V] (None under greedy); target_logits: [s + 1, V].
    """
    if params.is_greedy:
        return accept_greedy(draft_tokens, target_logits.argmax(-1).tolist())
    return accept_sampled(
        draft_tokens, draft_probs, probabilities(target_logits, params), generator
    )


def accept_greedy(draft_tokens: list[int], target_tokens: list[int]) -> tuple[list[int], int]:
    """Accept while d_i == the target's argmax t_i; then emit t_{accepted+1} (s = 0: just t_1)."""
    accepted = 0
    while accepted < len(draft_tokens) and draft_tokens[accepted] == target_tokens[accepted]:
        accepted += 1
    return target_tokens[: accepted + 1], accepted


def accept_sampled(
    draft_tokens: list[int], q: torch.Tensor, p: torch.Tensor, generator: torch.Generator
) -> tuple[list[int], int]:
    """The rejection rule of the module docstring; q: [s, V] draft, p: [s + 1, V] target."""
    s = len(draft_tokens)
    idx = torch.arange(s, device=p.device)
    tokens = torch.tensor(draft_tokens, device=p.device)
    ratio = p[idx, tokens] / q[idx, tokens]  # p_i(d_i) / q_i(d_i); q_i(d_i) > 0 (d_i was drawn)
    uniform = torch.rand(s, generator=generator, device=p.device)
    rejected = (uniform >= ratio).tolist()  # accept iff u < min(1, ratio)
    accepted = rejected.index(True) if True in rejected else s
    if accepted == s:
        bonus = draw(p[s : s + 1], generator)
        return draft_tokens + bonus.tolist(), s
    residual = (p[accepted] - q[accepted]).clamp(min=0.0)
    residual = residual / residual.sum() if residual.sum() > 0 else p[accepted]
    correction = draw(residual[None, :], generator)
    return draft_tokens[:accepted] + correction.tolist(), accepted


class DraftProposer:
    """Runs the draft model (its own paged cache) to propose s tokens per speculating request.

    For a request with known tokens x_0..x_{N-1} of which the draft cache holds the first c_d, the
    first draft pass computes x_{c_d}..x_{N-1} (catching up on tokens produced since the draft last
    ran) and samples d_1; each further pass computes d_j and samples d_{j+1}. After proposing, the
    draft cache holds N + s - 1 tokens; `rollback` trims it to what the target accepted.
    """

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def num_blocks_needed(self, seqs_and_lengths: list[tuple[Sequence, int]]) -> int:
        return sum(
            self.runner.blocks.num_blocks_needed(seq.request_id, seq.num_tokens + s - 1)
            for seq, s in seqs_and_lengths
        )

    def propose(
        self, seqs_and_lengths: list[tuple[Sequence, int]]
    ) -> dict[str, tuple[list[int], torch.Tensor | None]]:
        """-> request id: (draft tokens d_1..d_s, their distributions [s, V] or None if greedy)."""
        tokens: dict[str, list[int]] = {seq.request_id: [] for seq, _ in seqs_and_lengths}
        probs: dict[str, list[torch.Tensor]] = {seq.request_id: [] for seq, _ in seqs_and_lengths}
        for j in range(max((s for _, s in seqs_and_lengths), default=0)):
            active = [seq for seq, s in seqs_and_lengths if s > j]
            logits = self.runner.run([self._chunk(seq, tokens[seq.request_id]) for seq in active])
            argmax = torch.cat(logits).argmax(-1).tolist()  # one batched op for greedy requests
            for seq, rows, best in zip(active, logits, argmax):
                if seq.params.is_greedy:
                    token = best
                else:
                    q = probabilities(rows, seq.params)  # [1, V]
                    token = int(draw(q, seq.generator))
                    probs[seq.request_id].append(q)
                tokens[seq.request_id].append(token)
                seq.num_draft_computed_tokens = seq.num_tokens + j
        greedy = {seq.request_id: seq.params.is_greedy for seq, _ in seqs_and_lengths}
        return {
            rid: (tokens[rid], None if greedy[rid] else torch.cat(probs[rid])) for rid in tokens
        }

    @staticmethod
    def _chunk(seq: Sequence, proposed: list[int]) -> Chunk:
        if not proposed:  # catch up on all known tokens the draft has not computed
            begin = min(seq.num_draft_computed_tokens, seq.num_tokens - 1)
            return Chunk(seq.request_id, seq.token_ids[begin:], begin, num_logits=1)
        return Chunk(seq.request_id, proposed[-1:], seq.num_tokens + len(proposed) - 1, 1)

    def rollback(self, seq: Sequence, num_valid_tokens: int) -> None:
        """Keep only the first `num_valid_tokens` draft cache entries (the rest were rejected)."""
        seq.num_draft_computed_tokens = min(seq.num_draft_computed_tokens, num_valid_tokens)
        self.runner.blocks.truncate(seq.request_id, seq.num_draft_computed_tokens)

    def free(self, request_id: str) -> None:
        self.runner.blocks.free(request_id)
