"""Text prompts for a conditional prior: a word vocabulary built from the class names.

A class name splits into words at spaces and slashes ("t-shirt/top" -> "t-shirt",
"top"; "ankle boot" -> "ankle", "boot"); a prompt is any sequence of known words
("boot", "ankle boot"). The prior sees the prompt's word ids, so while training it
is shown each multi-word class under its full name half of the time and under one
of its words the other half: then "boot" asks for an ankle boot.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

PAD = 0  # word id 0 pads a prompt to the vocabulary's max_len


def split_words(text: str) -> list[str]:
    return [w for w in re.split(r"[\s/]+", text.strip().lower()) if w]


class Vocabulary:
    """Words of the class names, ids 1..len(words) (0 pads).

    classes: the class names, in label order. ``max_len`` is the most words in one name.
    """

    def __init__(self, classes: tuple[str, ...] | list[str]):
        if not classes:
            raise ValueError("a vocabulary needs at least one class name")
        self.classes = tuple(classes)
        self.class_words = [split_words(c) for c in self.classes]
        if any(not ws for ws in self.class_words):
            raise ValueError(f"every class name needs a word, got {self.classes}")
        self.words = tuple(sorted({w for ws in self.class_words for w in ws}))
        self.ids = {w: i + 1 for i, w in enumerate(self.words)}
        self.max_len = max(len(ws) for ws in self.class_words)

    def __len__(self) -> int:
        """Number of word ids, padding included."""
        return len(self.words) + 1

    def tokenize(self, prompt: str) -> list[int]:
        """A prompt -> its word ids; ValueError listing the known words on an unknown one."""
        words = split_words(prompt)
        if not words:
            raise ValueError(f"--prompt is empty; known words: {', '.join(self.words)}")
        unknown = [w for w in words if w not in self.ids]
        if unknown:
            raise ValueError(f"--prompt {prompt!r}: unknown word{'s' * (len(unknown) > 1)} "
                             f"{', '.join(repr(w) for w in unknown)}; known words: {', '.join(self.words)}")
        if len(words) > self.max_len:
            raise ValueError(f"--prompt {prompt!r} has {len(words)} words, at most {self.max_len} are known to the "
                             f"prior (the longest class name)")
        return [self.ids[w] for w in words]

    def encode(self, prompts: list[str]) -> Tensor:
        """Prompts -> word ids (len(prompts), max_len) int64, padded with PAD."""
        return self._pad([self.tokenize(p) for p in prompts])

    def _pad(self, rows: list[list[int]]) -> Tensor:
        out = torch.full((len(rows), self.max_len), PAD, dtype=torch.int64)
        for r, ids in enumerate(rows):
            out[r, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out

    def class_tokens(self) -> Tensor:
        """The full name of every class as word ids (num_classes, max_len) int64."""
        return self._pad([[self.ids[w] for w in ws] for ws in self.class_words])

    def training_tokens(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Word ids (B, max_len) for labels (B,): the full class name, or half the time one of its words."""
        full = self.class_tokens()[labels]
        lengths = (full != PAD).sum(1)
        one_word = torch.rand(len(labels), generator=generator) < 0.5
        pick = (torch.rand(len(labels), generator=generator) * lengths).long()
        single = torch.full_like(full, PAD)
        single[:, 0] = full.gather(1, pick[:, None])[:, 0]
        return torch.where((one_word & (lengths > 1))[:, None], single, full)
