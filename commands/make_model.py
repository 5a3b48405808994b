"""`slos-serve make-model`: write a random-weight Llama checkpoint in the Hugging Face layout
(config.json, model.safetensors, tokenizer.json) that loads offline; with --draft also a smaller
draft model in DIR/draft sharing the tokenizer."""

from __future__ import annotations

import argparse
from pathlib import Path

DRAFT_SUBDIR = "draft"


DRAFT_KINDS = ("random", "early-exit")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help="tiny, small or 1b")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--draft", action="store_true", help=f"also write OUT/{DRAFT_SUBDIR}")
    parser.add_argument(
        "--draft-kind",
        default="random",
        choices=DRAFT_KINDS,
        help="random: the preset's small draft config with its own random weights (proposals "
        "mostly rejected); early-exit: the target's first half of layers plus its head "
        "(proposals often accepted)",
    )
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
    paths = make_model(
        args.preset,
        args.out,
        args.draft,
        args.seed,
        args.dtype,
        args.max_shard_mb,
        args.draft_kind,
    )
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
    draft_kind: str = "random",
) -> list[Path]:
    """Write the checkpoint (and with `draft` its draft in OUT/draft); returns the directories."""
    from engine_adapters.torch_engine.checkpoint import parse_dtype, save_model
    from engine_adapters.torch_engine.presets import early_exit_draft, preset, random_model
    from engine_adapters.torch_engine.tokenizer import save_tokenizer, train_tokenizer

    if draft_kind not in DRAFT_KINDS:
        raise ValueError(f"unknown draft kind {draft_kind!r} (known: {', '.join(DRAFT_KINDS)})")
    config = preset(preset_name)
    tokenizer = train_tokenizer(config.vocab_size, seed)
    max_shard_bytes = int(max_shard_mb * 2**20) if max_shard_mb else None
    torch_dtype = parse_dtype(dtype or config.torch_dtype)
    target = random_model(config, seed, torch_dtype)
    models = [(Path(out_dir), target)]
    if draft and draft_kind == "early-exit":
        num_layers = max(1, config.num_hidden_layers // 2)
        models.append((Path(out_dir) / DRAFT_SUBDIR, early_exit_draft(target, num_layers)))
    elif draft:
        draft_config = preset(preset_name, draft=True)
        draft_model = random_model(draft_config, seed + 1, torch_dtype)
        models.append((Path(out_dir) / DRAFT_SUBDIR, draft_model))
    for path, model in models:
        save_model(model, path, max_shard_bytes)
        save_tokenizer(tokenizer, path, model.config.max_position_embeddings)
    return [path for path, _ in models]
