"""Load and save Llama checkpoints in the Hugging Face layout: `config.json` plus
`model.safetensors`, or shards listed in `model.safetensors.index.json`. Local files only."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine_adapters.torch_engine.config import LlamaConfig
from engine_adapters.torch_engine.model import LlamaForCausalLM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Buffers some exporters store that we recompute.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} (known: {', '.join(DTYPES)})") from None


def load_config(model_dir: str | Path) -> LlamaConfig:
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a model directory needs config.json")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from None
    return LlamaConfig.from_hf_dict(data)


def weight_files(model_dir: str | Path) -> list[Path]:
    root = Path(model_dir)
    if (root / INDEX_FILE).is_file():
        weight_map = json.loads((root / INDEX_FILE).read_text())["weight_map"]
        return [root / name for name in sorted(set(weight_map.values()))]
    if (root / WEIGHTS_FILE).is_file():
        return [root / WEIGHTS_FILE]
    found = sorted(root.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no *.safetensors weights in {root}")
    return found


def load_model(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> LlamaForCausalLM:
    """Build the model from config.json and fill every parameter from the safetensors files."""
    config = load_config(model_dir)
    state = _read_tensors(model_dir)
    if "lm_head.weight" not in state and not config.tie_word_embeddings:
        # Some exports tie the output embedding without saying so in config.json.
        config = dataclasses.replace(config, tie_word_embeddings=True)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = dict(model.named_parameters())  # a tied lm_head appears once, as embed_tokens
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"unexpected tensor(s) for a Llama model: {unexpected[:3]}")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    for name, param in expected.items():
        if tuple(state[name].shape) != tuple(param.shape):
            raise ValueError(
                f"{name}: shape {tuple(state[name].shape)} != config's {tuple(param.shape)}"
            )
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    dtype = dtype or parse_dtype(config.torch_dtype)
    return model.to(device=device, dtype=dtype).eval()


def _read_tensors(model_dir: str | Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                if not name.endswith(_IGNORED_SUFFIXES):
                    state[name] = handle.get_tensor(name)
    return state


def save_model(
    model: LlamaForCausalLM, out_dir: str | Path, max_shard_bytes: int | None = None
) -> None:
    """Write config.json and the weights (one file, or shards plus an index when the weights
    exceed `max_shard_bytes`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    dtype_name = next(k for k, v in DTYPES.items() if v == model.lm_head.weight.dtype)
    hf = config.to_hf_dict()
    hf["torch_dtype"] = dtype_name
    (out / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.named_parameters()}
    shards = _shard(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(out / WEIGHTS_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _shard(state: dict[str, torch.Tensor], max_shard_bytes: int | None) -> list[dict]:
    if max_shard_bytes is None:
        return [state]
    shards: list[dict] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards
