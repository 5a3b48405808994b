"""An offline tokenizer for random-weight test models: a byte-level BPE trained with the
`tokenizers` library on text generated locally (pseudo-words from a seeded syllable grammar),
padded with reserved special tokens so that its size equals the model's vocabulary.

It is a stand-in for a real model's tokenizer: it round-trips any text (byte-level), but its merges
reflect the generated corpus, not natural language.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
TOKENIZER_FILE = "tokenizer.json"
_ONSETS = [
    "",
    "b",
    "c",
    "d",
    "f",
    "g",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "w",
    "z",
    "br",
    "ch",
    "cl",
    "dr",
    "fl",
    "gr",
    "pl",
    "pr",
    "sh",
    "st",
    "th",
    "tr",
]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ie", "oo", "ou"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck"]
_PUNCT = [".", ",", "?", "!", ";", ":"]


def generated_corpus(num_lines: int, seed: int = 0) -> list[str]:
    """Sentences of pseudo-words, numbers and punctuation; deterministic for a seed."""
    rng = random.Random(seed)
    lexicon = [
        "".join(
            rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
            for _ in range(rng.randint(1, 3))
        )
        for _ in range(4000)
    ]
    weights = [1.0 / (rank + 1) for rank in range(len(lexicon))]  # Zipf-like word frequencies
    lines = []
    for _ in range(num_lines):
        words = rng.choices(lexicon, weights, k=rng.randint(4, 16))
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice(_PUNCT))
    return lines


def train_tokenizer(vocab_size: int, seed: int = 0, num_lines: int | None = None) -> Tokenizer:
    """Byte-level BPE with BOS = id 0, EOS = id 1, exactly `vocab_size` entries, trained on
    `num_lines` generated sentences (default: 3 per vocabulary entry, at least 2000)."""
    num_lines = num_lines or max(2000, 3 * vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(generated_corpus(num_lines, seed), trainer=trainer)
    num_missing = vocab_size - tokenizer.get_vocab_size()
    if num_missing < 0:
        raise ValueError(f"vocab_size {vocab_size} is below the byte alphabet plus specials")
    tokenizer.add_special_tokens([f"<|reserved_{i}|>" for i in range(num_missing)])
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out_dir: str | Path, max_model_len: int) -> None:
    """tokenizer.json plus the tokenizer_config.json that HF/vLLM loaders expect."""
    out = Path(out_dir)
    tokenizer.save(str(out / TOKENIZER_FILE))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "model_max_length": max_model_len,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    path = Path(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return Tokenizer.from_file(str(path))
