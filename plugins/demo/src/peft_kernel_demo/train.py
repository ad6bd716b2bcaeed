"""The demo's model, training loop and scoring: a tiny Llama built from a config, no download."""

from __future__ import annotations

import random
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from peft_kernel_demo.tasks import Task, WordTokenizer


def build_base_model(vocab_size: int, seed: int) -> nn.Module:
    """A 2-layer Llama with random weights; the same ``seed`` always gives the same weights."""
    # the model's own modules, not ``from transformers import ...``: the top-level lazy module
    # scans every model family on first attribute access, which costs seconds on a small CPU
    from transformers.models.llama.configuration_llama import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    config._name_or_path = f"peft-kernel-demo/tiny-llama-seed{seed}"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def answer_logits(model: nn.Module, ids: torch.Tensor, last: torch.Tensor, **kwargs) -> torch.Tensor:
    """Next-token logits at each row's ``->`` position, shape ``(rows, vocab)``."""
    logits = model(input_ids=ids, **kwargs).logits
    return logits[torch.arange(ids.shape[0]), last]


def predictions(logits: torch.Tensor, task: Task, tokenizer: WordTokenizer) -> list[str]:
    """The task's answer word each row scores highest (chance = 1 / number of answer words)."""
    label_ids = torch.tensor([tokenizer.token_id(label) for label in task.labels])
    return [task.labels[i] for i in logits[:, label_ids].argmax(dim=-1).tolist()]


def accuracy(predicted: Sequence[str], expected: Sequence[str]) -> float:
    return sum(p == e for p, e in zip(predicted, expected)) / max(len(expected), 1)


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, tokenizer: WordTokenizer, **kwargs) -> float:
    ids, last = tokenizer.batch([e.text for e in task.test])
    logits = answer_logits(model, ids, last, **kwargs)
    return accuracy(predictions(logits, task, tokenizer), [e.label for e in task.test])


def train_adapter(
    model: nn.Module,
    task: Task,
    tokenizer: WordTokenizer,
    steps: int,
    seed: int,
    batch_size: int = 32,
    lr: float = 1e-2,
    progress: bool = True,
) -> list[float]:
    """Train the model's active adapter on ``task`` (cross-entropy on the answer token).

    Only parameters with ``requires_grad`` (the active adapter's) are optimised. Returns the loss
    of every step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10) * max(0.05, 1 - s / steps))
    rng = random.Random(seed)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc=f"training {task.name:<9}", disable=not progress, leave=True, unit="step", mininterval=0.5)
    for _ in bar:
        examples = rng.sample(task.train, min(batch_size, len(task.train)))
        ids, last = tokenizer.batch([e.text for e in examples])
        targets = torch.tensor([tokenizer.token_id(e.label) for e in examples])
        loss = nn.functional.cross_entropy(answer_logits(model, ids, last), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses
