"""`slos-serve make-model`: write a random-weight Llama checkpoint in the Hugging Face layout
(config.json, model.safetensors, tokenizer.json) that loads offline; with --draft also a smaller
draft model in DIR/draft sharing the tokenizer."""

from __future__ import annotations

import argparse
from pathlib import Path

DRAFT_SUBDIR = "draft"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help="tiny, small or 1b")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--draft", action="store_true", help=f"also write OUT/{DRAFT_SUBDIR}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype", default=None, help="float32, float16 or bfloat16 (default: preset's)"
    )
    parser.add_argument(
        "--max-shard-mb",
        type=float,
        default=None,
        help="split weights into shards of at most this size (with an index file)",
    )


def run(args: argparse.Namespace) -> int:
    paths = make_model(args.preset, args.out, args.draft, args.seed, args.dtype, args.max_shard_mb)
    for path in paths:
        print(f"wrote {path}")
    return 0


def make_model(
    preset_name: str,
    out_dir: str | Path,
    draft: bool = False,
    seed: int = 0,
    dtype: str | None = None,
    max_shard_mb: float | None = None,
) -> list[Path]:
    """Write the checkpoint(s); returns the model directories written."""
    from engine_adapters.torch_engine.checkpoint import parse_dtype, save_model
    from engine_adapters.torch_engine.presets import preset, random_model
    from engine_adapters.torch_engine.tokenizer import save_tokenizer, train_tokenizer

    config = preset(preset_name)
    tokenizer = train_tokenizer(config.vocab_size, seed)
    max_shard_bytes = int(max_shard_mb * 2**20) if max_shard_mb else None
    written = []
    targets = [(Path(out_dir), config, seed)]
    if draft:
        targets.append((Path(out_dir) / DRAFT_SUBDIR, preset(preset_name, draft=True), seed + 1))
    for path, cfg, model_seed in targets:
        model = random_model(cfg, model_seed, parse_dtype(dtype or cfg.torch_dtype))
        save_model(model, path, max_shard_bytes)
        save_tokenizer(tokenizer, path, cfg.max_position_embeddings)
        written.append(path)
        del model
    return written
