"""The demo's two bundled tasks and a word-level tokenizer over their tiny vocabulary.

Each task is a text file in ``data/``: ``split<TAB>sentence<TAB>label`` per line (``#`` lines are
comments). The answer is one word, so a task is "predict the next token after ``->``". Both tasks
use the same kind of sentence (``"the pizza was awful"``): what the model answers depends only on
which adapter serves the row, which is what a mixed batch shows off.
"""

from __future__ import annotations

from importlib import resources
from typing import Iterable, NamedTuple

import torch

PAD, BOS, UNK, ARROW = "<pad>", "<bos>", "<unk>", "->"
SPECIALS = (PAD, BOS, UNK, ARROW)
TASK_FILES = {"sentiment": "sentiment.txt", "topic": "topic.txt"}


class Example(NamedTuple):
    text: str
    label: str


class Task(NamedTuple):
    """One bundled task: its name, its answer words (in a fixed order) and its two splits."""

    name: str
    labels: tuple[str, ...]
    train: list[Example]
    test: list[Example]


def _parse(name: str, text: str) -> Task:
    splits: dict[str, list[Example]] = {"train": [], "test": []}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 3 or parts[0] not in splits:
            raise ValueError(f"demo data {name}: line {number} is not 'train|test<TAB>sentence<TAB>label': {line!r}")
        splits[parts[0]].append(Example(parts[1], parts[2]))
    labels = tuple(sorted({e.label for e in splits["train"] + splits["test"]}))
    return Task(name, labels, splits["train"], splits["test"])


def load_tasks() -> dict[str, Task]:
    """Both bundled tasks, read from the package data."""
    data = resources.files("peft_kernel_demo") / "data"
    return {name: _parse(name, (data / file).read_text(encoding="utf-8")) for name, file in TASK_FILES.items()}


class WordTokenizer:
    """Whitespace tokenizer over a closed vocabulary; prompts are ``<bos> words ->``."""

    def __init__(self, words: Iterable[str]):
        self.vocab = [*SPECIALS, *sorted(set(words) - set(SPECIALS))]
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id = self.ids[PAD]

    @classmethod
    def for_tasks(cls, tasks: Iterable[Task]) -> WordTokenizer:
        words: set[str] = set()
        for task in tasks:
            words.update(task.labels)
            for example in task.train + task.test:
                words.update(example.text.split())
        return cls(words)

    def __len__(self) -> int:
        return len(self.vocab)

    def token_id(self, word: str) -> int:
        return self.ids.get(word, self.ids[UNK])

    def encode_prompt(self, text: str) -> list[int]:
        return [self.ids[BOS], *(self.token_id(w) for w in text.split()), self.ids[ARROW]]

    def batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``input_ids`` and the index of each row's last prompt token (``->``).

        With right padding and causal attention, no real token ever attends to a pad, so no
        attention mask is needed and each row's answer logits sit at its ``->`` position.
        """
        rows = [self.encode_prompt(t) for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return ids, torch.tensor([len(r) - 1 for r in rows])
