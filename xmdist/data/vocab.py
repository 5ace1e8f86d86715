"""Caption vocabulary: built from the training split only, saved as JSON in the run directory."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

import torch

from xmdist.io import write_json_atomic

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(caption: str) -> list[str]:
    """Lower-case words and numbers; punctuation dropped."""
    return _WORD.findall(caption.lower())


class Vocab:
    """Word <-> index map with ``<pad>`` = 0, ``<start>`` = 1, ``<end>`` = 2, ``<unk>`` = 3."""

    def __init__(self, words: list[str]):
        specials = [PAD, START, END, UNK]
        if words[:4] != specials:
            words = specials + [w for w in words if w not in specials]
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 4) -> "Vocab":
        counts = Counter(w for c in captions for w in tokenize(c))
        return cls(sorted(w for w, n in counts.items() if n >= min_count))

    def encode(self, caption: str, max_words: int = 40) -> list[int]:
        unk = self.index[UNK]
        ids = [self.index.get(w, unk) for w in tokenize(caption)[:max_words]]
        return [self.index[START], *ids, self.index[END]]

    def decode(self, ids: Iterable[int]) -> str:
        skip = {self.index[PAD], self.index[START], self.index[END]}
        return " ".join(self.words[i] for i in ids if i not in skip)

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, {"words": self.words}, indent=None)

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        with open(path) as f:
            return cls(json.load(f)["words"])


def pad_captions(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (B, L) LongTensor padded with 0, and lengths (B,)."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    out = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out, lengths
