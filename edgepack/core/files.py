"""The side files of a model folder: what a tokenizer is read from, and what ships beside a model.

One list for every stage: a bundle built for any target carries the same tokenizer and config files
(sentencepiece models included), so an app's runtime finds what Hugging Face's loader would find.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# Files a Hugging Face tokenizer is read from; a folder with none of them has no tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "vocab.json", "merges.txt", "vocab.txt", "special_tokens_map.json", "added_tokens.json")
# Files copied beside a model: the tokenizer, its chat template and the model's configs.
SIDE_FILES = (*TOKENIZER_FILES, "chat_template.jinja", "config.json", "generation_config.json")
# What a graph was made from and the scheme's measured price (the ORT bundles carry them).
PROVENANCE_FILES = ("convert.json", "quantize.json")


def tokenizer_files(folder: Path) -> list[str]:
    """The tokenizer files present in `folder`, in TOKENIZER_FILES order."""
    return [name for name in TOKENIZER_FILES if (Path(folder) / name).is_file()]


def copy_side_files(destination: Path, *folders: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """Copy each of SIDE_FILES (then `extra`) from the first of `folders` that has it; return the names copied."""
    copied = []
    for name in (*SIDE_FILES, *extra):
        for folder in folders:
            if (Path(folder) / name).is_file():
                shutil.copy2(Path(folder) / name, Path(destination) / name)
                copied.append(name)
                break
    return copied
