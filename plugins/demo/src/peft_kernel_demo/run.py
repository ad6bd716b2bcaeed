"""``peft-kernel demo``: train two LoRA adapters, save, reload, serve one mixed batch.

Steps, all on CPU in well under a minute:

1. build a tiny Llama from a transformers config (random weights from ``--seed``, no download);
2. add two LoRA adapters, ``sentiment`` and ``topic``, and score them untrained;
3. train each on its bundled task (tqdm bar per adapter);
4. ``save_pretrained`` both in HF PEFT's format (``<output-dir>/sentiment``, ``<output-dir>/topic``);
5. rebuild the base model, reload both with ``PeftModel.from_pretrained`` + ``load_adapter``;
6. serve ONE mixed batch (``adapter_names=[...]``: rows of both tasks interleaved, plus
   ``"__base__"`` rows) and compare every row group with a single-adapter run.

Accuracy is the share of test sentences whose highest-scoring answer word (among the task's
answer words) is right, so chance is 1/2 for ``sentiment`` and 1/4 for ``topic``.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from peft_kernel.plugin_api import render_table
from peft_kernel_demo.tasks import Task, WordTokenizer, load_tasks
from peft_kernel_demo.train import accuracy, answer_logits, build_base_model, evaluate, predictions, train_adapter

BASE = "__base__"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
"""Every linear layer, the output layer included: the random base model's output layer is too
weak to express a confident answer, so LoRA adapts it too."""
DEFAULT_OUTPUT_DIR = "demo-output"


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _lora_config(rank: int) -> Any:
    from peft_kernel import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGET_MODULES), task_type="CAUSAL_LM")


def run_demo(
    steps: int = 200,
    seed: int = 0,
    output_dir: str | Path = DEFAULT_OUTPUT_DIR,
    rank: int = 8,
    lr: float = 3e-3,
    threads: int | None = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo and return its results (what ``--json`` prints)."""
    with _torch_threads(threads):
        return _run(steps, seed, Path(output_dir), rank, lr, progress)


def _run(steps: int, seed: int, output_dir: Path, rank: int, lr: float, progress: bool) -> dict[str, Any]:
    from peft_kernel import PeftModel, get_peft_model

    start = time.perf_counter()
    if progress:
        print("loading transformers and building the tiny model...", file=sys.stderr, flush=True)
    import transformers.models.llama.modeling_llama  # noqa: F401  (the slowest part of startup; timed on its own)

    import_seconds = time.perf_counter() - start
    tasks = load_tasks()
    tokenizer = WordTokenizer.for_tasks(tasks.values())
    names = list(tasks)  # adapters are named after their task

    # 1-2. base model, two fresh adapters, untrained scores
    base = build_base_model(len(tokenizer), seed)
    base_params = sum(p.numel() for p in base.parameters())
    torch.manual_seed(seed)
    model = get_peft_model(base, _lora_config(rank), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, _lora_config(rank))
    before: dict[str, float] = {}
    for name in names:
        model.set_adapter(name)
        before[name] = evaluate(model, tasks[name], tokenizer)
    with model.disable_adapter():
        before_base = {name: evaluate(model, tasks[name], tokenizer) for name in names}

    # 3. training, one adapter at a time (only the active adapter's parameters train)
    losses: dict[str, list[float]] = {}
    trainable: dict[str, int] = {}
    train_start = time.perf_counter()
    for name in names:
        model.set_adapter(name)
        trainable[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        losses[name] = train_adapter(model, tasks[name], tokenizer, steps=steps, seed=seed, lr=lr, progress=progress)
    train_seconds = time.perf_counter() - train_start

    # 4. save in HF PEFT's format: non-default adapters go to sub-folders named after them
    model.save_pretrained(output_dir)
    del model, base

    # 5. a fresh base model (same seed, same weights) with both adapters reloaded from disk
    served = PeftModel.from_pretrained(build_base_model(len(tokenizer), seed), output_dir / names[0], adapter_name=names[0])
    for name in names[1:]:
        served.load_adapter(output_dir / name, adapter_name=name)
    served.eval()

    # 6. one mixed batch: every task's test rows under its adapter and under no adapter, interleaved
    groups = [(task, adapter) for task in names for adapter in (task, BASE)]
    rows: list[tuple[str, str, int]] = []  # (task, adapter, example index)
    longest = max(len(tasks[t].test) for t in names)
    for i in range(longest):
        rows.extend((t, a, i) for t, a in groups if i < len(tasks[t].test))
    ids, last = tokenizer.batch([tasks[t].test[i].text for t, _, i in rows])
    with torch.no_grad():
        mixed_logits = answer_logits(served, ids, last, adapter_names=[a for _, a, _ in rows])

    results = []
    max_diff = 0.0
    for task_name, adapter in groups:
        task: Task = tasks[task_name]
        picked = [k for k, (t, a, _) in enumerate(rows) if (t, a) == (task_name, adapter)]
        mixed = mixed_logits[picked]
        alone = _single_run(served, task, tokenizer, adapter)
        max_diff = max(max_diff, (mixed - alone).abs().max().item())
        expected = [e.label for e in task.test]
        results.append({
            "task": task_name,
            "adapter": adapter,
            "examples": len(task.test),
            "chance": 1 / len(task.labels),
            "before": before[task_name] if adapter != BASE else before_base[task_name],
            "after_mixed": accuracy(predictions(mixed, task, tokenizer), expected),
            "after_single": accuracy(predictions(alone, task, tokenizer), expected),
        })
    return {
        "model": {"architecture": "LlamaForCausalLM", "layers": 2, "hidden_size": 64,
                  "vocab_size": len(tokenizer), "parameters": base_params, "seed": seed},
        "lora": {"r": rank, "lora_alpha": 2 * rank, "target_modules": TARGET_MODULES, "trainable_parameters": trainable},
        "steps": steps,
        "learning_rate": lr,
        "final_loss": {name: sum(l[-10:]) / len(l[-10:]) for name, l in losses.items() if l},
        "output_dir": str(output_dir),
        "mixed_batch_rows": len(rows),
        "max_abs_logit_diff_mixed_vs_single": max_diff,
        "results": results,
        "import_seconds": import_seconds,
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start,
    }


@torch.no_grad()
def _single_run(model: Any, task: Task, tokenizer: WordTokenizer, adapter: str) -> torch.Tensor:
    ids, last = tokenizer.batch([e.text for e in task.test])
    if adapter == BASE:
        with model.disable_adapter():
            return answer_logits(model, ids, last)
    model.set_adapter(adapter)
    return answer_logits(model, ids, last)


def format_report(result: dict[str, Any]) -> str:
    """The human-readable table ``peft-kernel demo`` prints."""
    model, lora = result["model"], result["lora"]
    trainable = ", ".join(f"{k} {v:,}" for k, v in lora["trainable_parameters"].items())
    header = ("task", "adapter", "chance", "before training", "after: mixed batch", "after: adapter alone")
    body = [
        (r["task"], r["adapter"], _pct(r["chance"]), _pct(r["before"]), _pct(r["after_mixed"]), _pct(r["after_single"]))
        for r in result["results"]
    ]
    lines = [
        f"base model: tiny {model['architecture']} ({model['layers']} layers, hidden {model['hidden_size']}, "
        f"{model['vocab_size']}-word vocab, {model['parameters']:,} params, seed {model['seed']}), built from a config",
        f"adapters:   LoRA r={lora['r']} alpha={lora['lora_alpha']} on {', '.join(lora['target_modules'])}; "
        f"trainable params: {trainable}",
        f"trained:    {result['steps']} steps each, lr {result['learning_rate']:g}; final loss "
        + ", ".join(f"{k} {v:.3f}" for k, v in result["final_loss"].items()),
        f"saved:      {result['output_dir']}/<adapter> (HF PEFT format), reloaded onto a fresh base model",
        "",
        f"Accuracy on held-out sentences; 'mixed batch' is ONE forward of {result['mixed_batch_rows']} rows "
        "(adapter_names per row):",
        "",
        *render_table(header, body, right=(2, 3, 4, 5)),
        "",
        f"mixed batch vs adapter alone: max |logit difference| = {result['max_abs_logit_diff_mixed_vs_single']:.2e}",
        f"time: {result['total_seconds']:.1f} s (importing transformers {result['import_seconds']:.1f} s, "
        f"training {result['train_seconds']:.1f} s)",
        f"inspect an adapter: peft-kernel inspect {result['output_dir']}/{result['results'][0]['adapter']}",
    ]
    return "\n".join(lines)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"
