"""Hardware facts the simulator needs beyond a performance model: KV memory per replica and the
KV transfer cost between replicas (disaggregated formulations).

KV memory defaults per performance-model preset (`DEFAULT_KV_TOKENS`): 90% of GPU memory, minus the
fp16 weights, divided by the fp16 KV bytes per token (2 (K and V) * layers * hidden * 2 bytes):
- OPT-13B (40 layers, hidden 5120: 819,200 B/token, 26 GB weights) on 2 x A100-80GB:
  (144 - 26) GB / 819,200 B = ~144k tokens;
- OPT-6.7B (32 layers, hidden 4096: 524,288 B/token, 13.4 GB) on 1 x A100-80GB:
  (72 - 13.4) GB / 524,288 B = ~112k tokens;
- OPT-13B on 1 x H100-80GB: (72 - 26) GB / 819,200 B = ~56k tokens.

KV transfer for disaggregated formulations:
`latency + num_tokens * kv_bytes_per_token / link_bytes_per_s`,
with the model's KV bytes per token (above) and a 25 GB/s link by default (PCIe 4.0 x16 between GPUs
of one node; NVLink would be ~10x faster, a cross-node 100 Gb/s NIC 2x slower).
"""

from __future__ import annotations

DEFAULT_KV_TOKENS = {"opt-13b-2xa100": 144_000, "opt-6.7b-a100": 112_000, "opt-13b-h100": 56_000}
KV_BYTES_PER_TOKEN = {"opt-13b-2xa100": 819_200, "opt-6.7b-a100": 524_288, "opt-13b-h100": 819_200}
FALLBACK_KV_TOKENS = 100_000
FALLBACK_KV_BYTES = 819_200
DEFAULT_LINK_BYTES_PER_S = 25e9


def default_kv_tokens(perf_model_name: str) -> int:
    """KV tokens a replica of this preset holds (FALLBACK_KV_TOKENS for other models)."""
    return DEFAULT_KV_TOKENS.get(perf_model_name, FALLBACK_KV_TOKENS)


def kv_bytes_per_token(perf_model_name: str) -> int:
    return KV_BYTES_PER_TOKEN.get(perf_model_name, FALLBACK_KV_BYTES)
