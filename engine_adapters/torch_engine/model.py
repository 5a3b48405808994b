"""The Llama decoder (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP), with module
names matching Hugging Face's `LlamaForCausalLM` so that checkpoints load by name.

One forward computes a ragged batch (see ragged_batch.py) against a paged KV cache and returns
logits only for the rows asked for (the rows that sample a token), in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine_adapters.torch_engine.config import LlamaConfig
from engine_adapters.torch_engine.kv_cache import PagedKVCache
from engine_adapters.torch_engine.ragged_batch import RaggedBatch


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """theta_i = rope_theta^(-2i/d), with HF's "linear" and "llama3" frequency scalings."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        inv_freq = _llama3_scaled(inv_freq, scaling)
    elif kind != "default":
        raise ValueError(f"unsupported rope_scaling type {kind!r}")
    return inv_freq.float()


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by `factor`, short ones kept, a smooth blend
    between low_freq_factor and high_freq_factor wavelengths."""
    factor = float(scaling["factor"])
    low, high = (
        float(scaling.get("low_freq_factor", 1.0)),
        float(scaling.get("high_freq_factor", 4.0)),
    )
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(is_mid, blended, out)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by position * theta_i (HF's rotate-half layout).
    x: [T, heads, D]; cos, sin: [T, 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_index: int) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            d,
        )
        self.layer_index = layer_index
        bias = config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: RaggedBatch,
        cache: PagedKVCache,
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q = apply_rope(self.q_proj(x).view(tokens, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        cache.write(self.layer_index, batch.slots, k.to(cache.key.dtype), v.to(cache.value.dtype))
        out = torch.empty_like(q)  # [T, H, D]
        for group in batch.groups:
            keys, values = cache.gather(self.layer_index, group.key_blocks)  # [B, L, KVH, D]
            attn = F.scaled_dot_product_attention(
                q[group.query_rows].transpose(1, 2),  # [B, H, Q, D]
                keys.transpose(1, 2).to(q.dtype),  # [B, KVH, L, D]
                values.transpose(1, 2).to(q.dtype),
                attn_mask=group.mask,
                is_causal=group.mask is None,
                enable_gqa=self.num_heads != self.num_kv_heads,
            )  # [B, H, Q, D]
            out[group.valid_rows] = attn.transpose(1, 2)[group.query_valid]
        return self.o_proj(out.view(tokens, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        h, m, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, m, bias=bias)
        self.up_proj = nn.Linear(h, m, bias=bias)
        self.down_proj = nn.Linear(m, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cos, sin, batch: RaggedBatch, cache: PagedKVCache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # A plain float32 attribute, not a buffer: `.to(bfloat16)` must not round the frequencies.
        self._inv_freq_by_device: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq_by_device:
            self._inv_freq_by_device[device] = rope_inv_freq(self.config).to(device)
        return self._inv_freq_by_device[device]

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        batch: RaggedBatch,
        cache: PagedKVCache,
        logits_rows: torch.Tensor,
    ) -> torch.Tensor:
        """input_ids: [T]; logits_rows: [R] rows of the flat batch to project.
        -> logits [R, vocab] float32."""
        angles = (
            batch.positions.float()[:, None] * self.inv_freq(input_ids.device)[None, :]
        )  # [T, D/2]
        angles = torch.cat((angles, angles), dim=-1)[:, None, :]  # [T, 1, D]
        x = self.model.embed_tokens(input_ids)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, batch, cache)
        return self.lm_head(self.model.norm(x[logits_rows])).float()

    def new_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        param = self.lm_head.weight
        return PagedKVCache(
            self.config.num_hidden_layers,
            num_blocks,
            self.config.num_key_value_heads,
            self.config.head_dim,
            block_size,
            param.dtype,
            param.device,
        )
