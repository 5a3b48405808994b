"""The checkpoint loader and the paged, ragged forward pass against an independent reference:
a plain full-sequence Llama written here from the safetensors tensors (no KV cache, no paging,
explicit softmax attention), sharing no code with engine_adapters.torch_engine."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from commands.make_model import make_model
from engine_adapters.torch_engine.checkpoint import load_model, save_model
from engine_adapters.torch_engine.model_runner import Chunk, ModelRunner
from engine_adapters.torch_engine.presets import preset, random_model

torch.set_num_threads(1)


def reference_logits(model_dir, token_ids: list[int]) -> torch.Tensor:
    """Full-sequence forward from the raw checkpoint: [len(token_ids), vocab] float64."""
    cfg = json.loads((model_dir / "config.json").read_text())
    w = {k: v.double() for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    seq = len(token_ids)

    def norm(x, weight):
        return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg["rms_norm_eps"])

    def rotate(x):  # x: [seq, heads, d]; pair (i, i + d/2) rotated by pos * theta_i
        out = x.clone()
        for pos in range(seq):
            for i in range(d // 2):
                angle = pos * cfg["rope_theta"] ** (-2.0 * i / d)
                c, s = math.cos(angle), math.sin(angle)
                a, b = x[pos, :, i], x[pos, :, i + d // 2]
                out[pos, :, i], out[pos, :, i + d // 2] = a * c - b * s, b * c + a * s
        return out

    x = w["model.embed_tokens.weight"][token_ids]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q = rotate((h @ w[p + "self_attn.q_proj.weight"].T).view(seq, n_heads, d))
        k = rotate((h @ w[p + "self_attn.k_proj.weight"].T).view(seq, n_kv, d))
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(seq, n_kv, d)
        heads = []
        for head in range(n_heads):
            kv_head = head // (n_heads // n_kv)
            scores = q[:, head] @ k[:, kv_head].T / math.sqrt(d)
            scores = scores.masked_fill(torch.ones(seq, seq).triu(1).bool(), float("-inf"))
            heads.append(torch.softmax(scores, -1) @ v[:, kv_head])
        x = x + torch.cat(heads, -1) @ w[p + "self_attn.o_proj.weight"].T
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return norm(x, w["model.norm.weight"]) @ head.T


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    make_model("tiny", out, draft=False, seed=0)
    return out


def paged_logits(model, chunks_of_tokens: list[list[int]], num_blocks: int = 32) -> torch.Tensor:
    """Run one request through the paged engine path, chunk by chunk; logits of every position."""
    runner = ModelRunner(model, num_blocks)
    out, done = [], 0
    for chunk in chunks_of_tokens:
        (logits,) = runner.run([Chunk("r", chunk, done, num_logits=len(chunk))])
        out.append(logits)
        done += len(chunk)
    return torch.cat(out)


def test_loaded_model_matches_reference_forward(tiny_dir):
    model = load_model(tiny_dir)
    tokens = torch.randint(2, 512, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = paged_logits(model, [tokens])
    ref = reference_logits(tiny_dir, tokens)
    torch.testing.assert_close(ours.double(), ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_greedy_generation_matches_reference_and_varies(tiny_dir):
    model = load_model(tiny_dir)
    prompt = [5, 17, 300, 42, 9]
    tokens = list(prompt)
    for _ in range(24):
        tokens.append(int(reference_logits(tiny_dir, tokens)[-1].argmax()))
    runner = ModelRunner(model, 16)
    ours = list(prompt)
    (logits,) = runner.run([Chunk("r", prompt, 0, 1)])
    while len(ours) < len(tokens):
        ours.append(int(logits[-1].argmax()))
        (logits,) = runner.run([Chunk("r", ours[-1:], len(ours) - 1, 1)])
    assert ours == tokens
    assert len(set(tokens[len(prompt) :])) >= 8, "random weights should give non-degenerate output"


def test_sharded_and_tied_checkpoints_load(tmp_path):
    config = preset("tiny")
    tied = random_model(type(config)(**{**_fields(config), "tie_word_embeddings": True}), seed=3)
    save_model(tied, tmp_path, max_shard_bytes=100_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    for (name, a), (_, b) in zip(tied.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name


def test_bfloat16_load_keeps_rope_in_float32(tiny_dir):
    model = load_model(tiny_dir, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.inv_freq(torch.device("cpu")).dtype == torch.float32
    logits = paged_logits(model, [[3, 4, 5, 6]])
    ref = reference_logits(tiny_dir, [3, 4, 5, 6])
    assert torch.isfinite(logits).all()
    assert (logits.double() - ref).abs().max() < 0.25 * ref.abs().max()


def test_bad_checkpoints_are_refused_clearly(tmp_path, tiny_dir):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="only Llama"):
        load_model(tmp_path)
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["hidden_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="shape"):
        load_model(tmp_path)


def _fields(config) -> dict:
    return {f: getattr(config, f) for f in config.__dataclass_fields__}


def test_hf_config_variants_load(tmp_path, tiny_dir):
    """Llama 3 style config.json: EOS list, llama3 rope scaling, no head_dim, extra keys, and an
    exporter's stray rotary buffer in the weights."""
    from safetensors.torch import save_file

    from engine_adapters.torch_engine.model import rope_inv_freq

    cfg = json.loads((tiny_dir / "config.json").read_text())
    del cfg["head_dim"]
    cfg.update(
        eos_token_id=[1, 7],
        transformers_version="4.45.0",
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(tiny_dir / "model.safetensors"))
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    model = load_model(tmp_path)
    assert model.config.eos_token_id == 1 and model.config.head_dim == 32
    assert model.config.to_hf_dict()["transformers_version"] == "4.45.0"
    # Llama 3.1 scaling, computed independently per frequency
    expected = []
    for i in range(16):
        freq = 500000.0 ** (-2 * i / 32)
        wavelen = 2 * math.pi / freq
        if wavelen < 64 / 4.0:
            expected.append(freq)
        elif wavelen > 64 / 1.0:
            expected.append(freq / 8.0)
        else:
            smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
            expected.append((1 - smooth) * freq / 8.0 + smooth * freq)
    torch.testing.assert_close(
        rope_inv_freq(model.config), torch.tensor(expected), rtol=1e-6, atol=0
    )
    assert torch.isfinite(paged_logits(model, [[2, 3, 4]])).all()


def test_offline_tokenizer_matches_the_model(tiny_dir):
    from engine_adapters.torch_engine.tokenizer import BOS_TOKEN, EOS_TOKEN, load_tokenizer

    tokenizer = load_tokenizer(tiny_dir)
    config = load_model(tiny_dir).config
    assert tokenizer.get_vocab_size() == config.vocab_size
    assert tokenizer.token_to_id(BOS_TOKEN) == config.bos_token_id
    assert tokenizer.token_to_id(EOS_TOKEN) == config.eos_token_id
    text = "Plain words, 1234 numbers and ünïcödé ✓ round-trip byte-level."
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    assert max(ids) < config.vocab_size and len(ids) < len(text.encode())  # merges were learned
    tokenizer_config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == EOS_TOKEN
