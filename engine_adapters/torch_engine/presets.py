"""Model presets for `slos-serve make-model`: random-weight Llama configs.

Every preset has head_dim >= 32 (vLLM's CPU attention rejects 16) so one test checkpoint serves the
torch and the vLLM engines. Each target preset has a draft preset: a smaller config with the same
vocabulary and tokenizer, for speculative decoding.
"""

from __future__ import annotations

import torch

from engine_adapters.torch_engine.config import LlamaConfig

_COMMON = dict(bos_token_id=0, eos_token_id=1, rope_theta=10000.0, rms_norm_eps=1e-5)

PRESETS: dict[str, LlamaConfig] = {
    # ~0.16 M parameters: unit tests.
    "tiny": LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        **_COMMON,
    ),
    # ~4 M parameters: CPU demos and benchmarks.
    "small": LlamaConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        **_COMMON,
    ),
    # ~1 B parameters, Llama-3.2-1B-like shape (smaller vocabulary): GPU runs.
    "1b": LlamaConfig(
        vocab_size=8192,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
        **{**_COMMON, "rope_theta": 500000.0},
    ),
}

DRAFT_PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        **_COMMON,
    ),
    "small": LlamaConfig(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        **_COMMON,
    ),
    "1b": LlamaConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
        **{**_COMMON, "rope_theta": 500000.0},
    ),
}


def preset(name: str, draft: bool = False) -> LlamaConfig:
    table = DRAFT_PRESETS if draft else PRESETS
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r} (known: {', '.join(PRESETS)})") from None


def random_model(config: LlamaConfig, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A Llama model with seeded random weights scaled so that greedy outputs vary with context.

    Weights ~ N(0, 1/fan_in) keep every layer's output at unit scale, so attention (and hence the
    context) visibly moves the logits; embeddings ~ N(0, 1). Norm weights are 1.
    """
    from engine_adapters.torch_engine.model import LlamaForCausalLM

    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):  # no default init: a 1b model would spend most of its time there
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    if config.tie_word_embeddings:  # to_empty materialises a shared parameter twice
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            elif name == "model.embed_tokens.weight":
                param.normal_(0.0, 1.0, generator=generator)
            else:
                param.normal_(0.0, param.shape[1] ** -0.5, generator=generator)
    return model.eval()


def early_exit_draft(target, num_layers: int):
    """A draft made of the target's embeddings, its first `num_layers` decoder layers, its final
    norm and its output head (early exit, as in self-speculative decoding). Unlike an unrelated
    random draft its proposals correlate with the target's, so some get accepted."""
    import dataclasses

    from engine_adapters.torch_engine.model import LlamaForCausalLM

    if not 1 <= num_layers <= target.config.num_hidden_layers:
        raise ValueError(f"an early-exit draft keeps 1..{target.config.num_hidden_layers} layers")
    config = dataclasses.replace(target.config, num_hidden_layers=num_layers)
    with torch.device("meta"):
        draft = LlamaForCausalLM(config)
    wanted = draft.state_dict().keys()  # a tied head appears under both names here
    state = {k: v.detach().clone() for k, v in target.state_dict().items() if k in wanted}
    draft.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        draft.lm_head.weight = draft.model.embed_tokens.weight
    return draft.eval()
