"""Training data: reading the user's file (JSONL / JSON / CSV / plain text), the bundled default,
the train/eval split, and tokenization into causal-LM examples.

An example is ``{"text": ...}`` (loss on every token) or ``{"prompt": ..., "completion": ...}``
(loss on the completion only; the two strings are joined as they are, so a completion usually
starts with a space, as in TRL's prompt-completion datasets).
"""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path
from typing import Any, Iterator

from peft_kernel.plugin_api import CliError

ACCEPTED = "'text', or 'prompt' and 'completion'"
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
CSV_SUFFIXES = (".csv",)


def _example(row: Any, where: str) -> dict[str, str]:
    """One record as an example, or a CliError naming the place and what is accepted."""
    if not isinstance(row, dict):
        raise CliError(f"{where}: expected an object with {ACCEPTED}, got {type(row).__name__}")
    text, prompt, completion = row.get("text"), row.get("prompt"), row.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str) and completion:
        return {"prompt": prompt, "completion": completion}
    if isinstance(text, str) and text.strip():
        return {"text": text}
    keys = ", ".join(repr(str(k)) for k in row) or "none"
    if "prompt" in row or "completion" in row:
        problem = "'prompt' and 'completion' must both be strings, the completion not empty"
    elif "text" in row:
        problem = "'text' must be a non-empty string"
    else:
        problem = f"no usable field (found {keys})"
    raise CliError(f"{where}: {problem}; each example needs {ACCEPTED}")


def _json_rows(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON list of objects
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CliError(f"{path}: not valid JSON: {exc}") from None
        for i, row in enumerate(rows):
            yield f"{path}: item {i}", row
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CliError(f"{path}: line {number} is not valid JSON ({exc.msg}); JSONL needs one object per line") from None
        yield f"{path}: line {number}", row


def _csv_rows(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    reader = csv.DictReader(text.splitlines())
    columns = reader.fieldnames or []
    if "text" not in columns and not {"prompt", "completion"} <= set(columns):
        raise CliError(f"{path}: the CSV header {columns} has no usable column; it needs {ACCEPTED}")
    for number, row in enumerate(reader, 2):
        yield f"{path}: line {number}", {k: v for k, v in row.items() if k is not None}


def read_examples(path: str | Path) -> list[dict[str, str]]:
    """The examples in a data file; the format follows the suffix (.jsonl/.json/.ndjson, .csv, else text lines)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CliError(f"{file}: not UTF-8 text (byte {exc.start}); the data must be JSONL, CSV or plain text") from None
    suffix = file.suffix.lower()
    if suffix in JSON_SUFFIXES:
        examples = [_example(row, where) for where, row in _json_rows(file, text)]
    elif suffix in CSV_SUFFIXES:
        examples = [_example(row, where) for where, row in _csv_rows(file, text)]
    else:  # plain text: one example per non-empty line
        examples = [{"text": line} for line in text.splitlines() if line.strip()]
    if not examples:
        raise CliError(f"{file}: no examples in the file; it needs JSONL objects with {ACCEPTED}, a CSV with those "
                       "columns, or lines of plain text")
    return examples


def bundled_examples() -> list[dict[str, str]]:
    """The default data: the demo's two bundled tasks as prompt/completion pairs
    (``"sentiment: the pizza was awful ->"`` + ``" negative"``)."""
    from peft_kernel_demo.tasks import load_tasks

    examples = []
    for name, task in load_tasks().items():
        for example in task.train + task.test:
            examples.append({"prompt": f"{name}: {example.text} ->", "completion": f" {example.label}"})
    return examples


def split(examples: list[dict[str, str]], eval_share: float, seed: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Shuffle (seeded) and hold out ``eval_share`` of the examples (at least one when the share is
    above 0 and there are two or more examples)."""
    rows = list(examples)
    random.Random(seed).shuffle(rows)
    if eval_share <= 0 or len(rows) < 2:
        return rows, []
    n_eval = min(len(rows) - 1, max(1, math.ceil(eval_share * len(rows))))
    return rows[n_eval:], rows[:n_eval]


def tokenize(example: dict[str, str], tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """``input_ids`` / ``attention_mask`` / ``labels`` (``-100`` on prompt tokens), ended by EOS
    when the tokenizer has one, truncated to ``max_length``."""
    eos = tokenizer.eos_token_id
    if "text" in example:
        ids = list(tokenizer(example["text"])["input_ids"])
        prompt_len = 0
    else:
        prompt_ids = list(tokenizer(example["prompt"])["input_ids"])
        ids = list(tokenizer(example["prompt"] + example["completion"])["input_ids"])
        if ids[: len(prompt_ids)] != prompt_ids:  # the join merged tokens across the boundary
            ids = prompt_ids + list(tokenizer(example["completion"], add_special_tokens=False)["input_ids"])
        prompt_len = len(prompt_ids)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    ids = ids[:max_length]
    labels = [-100] * min(prompt_len, len(ids)) + ids[prompt_len:]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def tokenize_all(examples: list[dict[str, str]], tokenizer: Any, max_length: int, where: str) -> list[dict[str, list[int]]]:
    rows = [tokenize(e, tokenizer, max_length) for e in examples]
    kept = [r for r in rows if any(label != -100 for label in r["labels"])]
    if examples and not kept:
        raise CliError(f"{where}: every example was truncated to its prompt by --max-length {max_length}; "
                       "nothing is left to learn from")
    return kept
