"""The training job behind ``peft-kernel finetune``.

Built on transformers' ``Trainer`` (through ``peft_kernel_finetune.trainer`` for
adapter-only checkpoints) and torch.distributed: under ``torchrun`` the Trainer runs distributed
data parallel (gloo on CPU, NCCL on GPUs), logs the loss averaged over the processes and saves
from rank 0 only; with ``--fsdp`` the model is sharded with FSDP2 first (see :func:`shard`).
Nothing here is specific to a method: the adapter comes from the method's
config class, found in the plugin registry by ``--method``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from peft_kernel.plugin_api import CliError
from peft_kernel_finetune import data as data_mod
from peft_kernel_finetune.options import OPTIONS, Settings, check_peft_fields, config_fields, find_method, resolve

CHECKPOINTS = "checkpoints"
BASE_MODEL = "base_model"
METRICS = "metrics.json"
PLOT = "loss.png"
EMBEDDED_NAME = "embedded tiny Llama"


# ---- entry points -----------------------------------------------------------------------------
def run_from_args(args: argparse.Namespace) -> int:
    settings = resolve(args)
    metrics = run(settings)
    if metrics.get("rank", 0) == 0:
        if settings.json:
            print(json.dumps(metrics, indent=2))
        else:
            print(summary(metrics))
    return 0


def finetune(**options: Any) -> dict[str, Any]:
    """``peft-kernel finetune`` from Python: keywords are the long options (``eval_split=0.2``),
    plus ``config`` (a file) and ``peft`` (a dict of the method's config fields)."""
    known = {o.key for o in OPTIONS} | {"config", "peft"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"finetune() got unknown option(s) {unknown}; accepted: {sorted(known)}")
    from peft_kernel_finetune.options import BY_KEY, _coerce

    namespace = argparse.Namespace(**{key: None for key in known})
    peft = options.pop("peft", None) or {}
    if not isinstance(peft, dict):
        raise CliError(f"peft=: expected a dict of the method's config fields, got {type(peft).__name__}")
    for key, value in options.items():
        if value is not None and key in BY_KEY:
            value = _coerce(BY_KEY[key], str(value) if BY_KEY[key].kind == "str" and isinstance(value, Path) else value, f"{key}=")
        setattr(namespace, key, value)
    settings = resolve(namespace)
    for key, value in peft.items():
        settings.peft[key] = value
        settings.peft_sources[key] = "peft="
    return run(settings)


# ---- pieces -----------------------------------------------------------------------------------
def peft_config(settings: Settings, record: Any) -> Any:
    """The method's config: the job's defaults, then the config file's ``peft:`` section, then ``--peft``."""
    from peft_kernel_finetune.tiny import LORA_DEFAULTS, TARGET_MODULES

    for source in dict.fromkeys(settings.peft_sources.values()):
        check_peft_fields(record, {k: v for k, v in settings.peft.items() if settings.peft_sources[k] == source}, source)
    fields = set(config_fields(record.config_class))
    values: dict[str, Any] = {}
    if "task_type" in fields:
        values["task_type"] = "CAUSAL_LM"
    if settings.embedded:  # the tiny model needs its output layer adapted too, and LoRA a little more room
        if "target_modules" in fields:
            values["target_modules"] = list(TARGET_MODULES)
        if record.peft_type == "LORA":
            values.update(LORA_DEFAULTS)
    values.update(settings.peft)
    sources = sorted(set(settings.peft_sources.values())) or ["defaults"]
    return record.config_class.from_dict(values, source=" + ".join(sources))


def adapter_method(settings: Settings) -> Any:
    """``--from-adapter``: the saved adapter's method; ``--method`` (if not the default) must agree and
    ``--peft`` fields cannot change a trained adapter."""
    from peft_kernel.plugin_api import PeftConfig, PeftKernelError

    try:
        saved = PeftConfig.from_pretrained(settings.from_adapter)
    except (OSError, PeftKernelError, ValueError) as exc:
        raise CliError(f"--from-adapter {settings.from_adapter}: {exc}") from None
    peft_type = str(getattr(saved.peft_type, "value", saved.peft_type))
    record = find_method(peft_type)
    if settings.method.upper().replace("-", "_") not in (peft_type, "LORA"):
        raise CliError(f"--from-adapter {settings.from_adapter} is a {peft_type.lower()} adapter, not {settings.method}")
    if settings.peft:
        raise CliError(f"--from-adapter {settings.from_adapter}: the saved adapter's config is fixed; drop "
                       f"{', '.join(sorted(settings.peft))} from --peft / the config file's peft: section")
    return record


def resume_checkpoint(path: str | None) -> str | None:
    """``--resume``: a checkpoint folder, or the newest checkpoint in a folder of them (or in an earlier output)."""
    if path is None:
        return None
    from transformers.trainer_utils import get_last_checkpoint

    folder = Path(path)
    if not folder.is_dir():
        raise CliError(f"--resume {path}: no such folder")
    if (folder / "trainer_state.json").is_file():
        return str(folder)
    for candidate in (folder, folder / CHECKPOINTS):
        if candidate.is_dir():
            last = get_last_checkpoint(str(candidate))
            if last is not None:
                return last
    raise CliError(f"--resume {path}: not a checkpoint (no trainer_state.json) and no checkpoint-N folder in it "
                   f"or in {folder / CHECKPOINTS}")


def load_model(settings: Settings, examples: list[dict[str, str]]) -> tuple[Any, Any, str]:
    """(model, tokenizer, description) for ``--model`` or the embedded tiny model."""
    if settings.embedded:
        from peft_kernel_finetune.tiny import embedded_model

        model, tokenizer = embedded_model(examples)
        return model, tokenizer, EMBEDDED_NAME
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(settings.model)
        model = AutoModelForCausalLM.from_pretrained(settings.model)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CliError(f"--model {settings.model}: cannot load a causal LM and its tokenizer: {first}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return model, tokenizer, settings.model


class LiveProgress:
    """A tqdm bar over the optimizer steps with the latest training and eval loss (rank 0 only)."""

    def __new__(cls, enabled: bool) -> Any:
        from tqdm.auto import tqdm
        from transformers import TrainerCallback

        class _Progress(TrainerCallback):
            def __init__(self) -> None:
                self.bar = None
                self.postfix: dict[str, str] = {}

            def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
                if enabled and state.is_world_process_zero:
                    self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="finetune", unit="step",
                                    dynamic_ncols=True, file=sys.stderr)

            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
                if self.bar is not None:
                    self.bar.update(state.global_step - self.bar.n)

            def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
                if self.bar is None or not logs:
                    return
                if "loss" in logs:
                    self.postfix["loss"] = f"{logs['loss']:.4f}"
                if "eval_loss" in logs:
                    self.postfix["eval_loss"] = f"{logs['eval_loss']:.4f}"
                self.bar.set_postfix(self.postfix, refresh=False)

            def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
                if self.bar is not None:
                    self.bar.close()
                    self.bar = None

        return _Progress()


class FirstEvaluation:
    """Keeps the metrics of the first evaluation of the run (``eval_on_start``: before training)."""

    def __new__(cls) -> Any:
        from transformers import TrainerCallback

        class _First(TrainerCallback):
            metrics: dict[str, float] | None = None

            def on_evaluate(self, args, state, control, metrics=None, **kwargs):  # noqa: ANN001
                if self.metrics is None and metrics:
                    self.metrics = dict(metrics)

        return _First()


def _history(log_history: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    steps: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            row = {"step": int(entry["step"]), "loss": float(entry["loss"])}
            for key in ("learning_rate", "grad_norm"):
                if entry.get(key) is not None:
                    row[key] = float(entry[key])
            steps[row["step"]] = row
        if "eval_loss" in entry and "step" in entry:
            evals[int(entry["step"])] = {"step": int(entry["step"]), "loss": float(entry["eval_loss"])}
    return [steps[k] for k in sorted(steps)], [evals[k] for k in sorted(evals)]


def plot_losses(metrics: dict[str, Any], path: Path) -> None:
    """``loss.png``: the training loss per step and the eval loss (before, during, after training)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    steps = metrics["steps"]
    if steps:
        ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], color="tab:blue", linewidth=1.2, label="train loss")
    evals = list(metrics["eval"]["history"])
    before, after = metrics["eval"]["before"], metrics["eval"]["after"]
    if before is not None and not any(e["step"] == 0 for e in evals):
        evals.insert(0, {"step": 0, "loss": before["loss"]})
    if evals:
        ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], color="tab:orange", marker="o", markersize=4,
                linewidth=1.2, label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    model = metrics["model"] if len(metrics["model"]) < 40 else "…" + metrics["model"][-39:]
    title = f"{metrics['method']} on {model}, world size {metrics['world_size']}"
    if before is not None and after is not None:
        title += f": eval {before['loss']:.2f} → {after['loss']:.2f}"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def summary(metrics: dict[str, Any]) -> str:
    out = Path(metrics["output"])
    lines = [
        f"finetune: {metrics['method']} on {metrics['model']} ({metrics['trainable_parameters']:,} trainable of "
        f"{metrics['total_parameters']:,} parameters), {metrics['train_examples']} train / {metrics['eval_examples']} "
        f"eval examples, world size {metrics['world_size']}",
    ]
    before, after = metrics["eval"]["before"], metrics["eval"]["after"]
    trained = f"{metrics['global_step']} steps in {metrics['seconds']['train']:.1f} s (total {metrics['seconds']['total']:.1f} s)"
    if before is not None and after is not None:
        lines.append(f"eval loss {before['loss']:.4f} -> {after['loss']:.4f} (before -> after training), {trained}")
    else:
        lines.append(f"trained {trained}; no evaluation (--eval-split 0)")
    lines.append(f"adapter:  {out / 'adapter_config.json'}, {out / 'adapter_model.safetensors'}")
    lines.append(f"metrics:  {out / METRICS}    loss curve: {out / PLOT}    checkpoints: {out / CHECKPOINTS}")
    if metrics.get("base_model_saved"):
        lines.append(f"base model (embedded, for from_pretrained): {out / BASE_MODEL}")
    return "\n".join(lines)


def _has_accelerator(torch: Any) -> bool:
    """A GPU (or other torch accelerator) to train on; else the CPU, with gloo between processes."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return bool(torch.cuda.is_available())


def shard(peft_model: Any, args: Any, torch: Any) -> Any:
    """``--fsdp``: shard the PEFT model with FSDP2 (each decoder layer, then the root) over all processes,
    and mark it prepared so that the Trainer (through accelerate) trains it as it is, without
    ``DistributedDataParallel``; FSDP2 averages the gradients itself."""
    from peft_kernel_finetune.fsdp import mark_prepared, shard_peft_model

    device = args.device  # sets up torch.distributed (gloo on CPU) as the Trainer will use it
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise CliError("--fsdp: needs torch.distributed: run under torchrun, e.g. "
                       "torchrun --nproc_per_node=2 \"$(command -v peft-kernel)\" finetune --fsdp")
    peft_model.to(device)
    return mark_prepared(shard_peft_model(peft_model))


# ---- the job ----------------------------------------------------------------------------------
def run(settings: Settings) -> dict[str, Any]:
    """Train, evaluate before and after, save the adapter, ``metrics.json`` and ``loss.png``;
    returns the metrics (every rank returns them; rank 0 writes the files)."""
    start = time.perf_counter()
    record = find_method(settings.method) if settings.from_adapter is None else adapter_method(settings)
    if settings.fsdp and settings.resume is not None:
        raise CliError("--fsdp with --resume: FSDP2 checkpoints hold the adapter only (no optimizer state); "
                       "continue from one with --from-adapter CHECKPOINT instead")
    checkpoint = resume_checkpoint(settings.resume)
    examples = data_mod.read_examples(settings.data) if settings.data else data_mod.bundled_examples()
    data_name = settings.data or "bundled sentiment/topic sentences"
    config = peft_config(settings, record) if settings.from_adapter is None else None  # a bad field fails before torch loads

    import torch
    import transformers
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, ProgressCallback, TrainingArguments

    from peft_kernel import get_peft_model
    from peft_kernel_finetune.trainer import Trainer

    verbosity, bars, threads = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled(), torch.get_num_threads()
    transformers.logging.set_verbosity_error()  # our bar and the summary say what matters
    transformers.logging.disable_progress_bar()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        train_examples, eval_examples = data_mod.split(examples, settings.eval_split, settings.seed)
        model, tokenizer, model_name = load_model(settings, examples)
        output = Path(settings.output).resolve()
        if settings.embedded:  # a base folder that from_pretrained (ours and HF's) can open, saved before the adapter goes in
            model.config._name_or_path = str(output / BASE_MODEL)
            if int(os.environ.get("RANK", "0")) == 0:
                output.mkdir(parents=True, exist_ok=True)
                model.save_pretrained(output / BASE_MODEL)
                tokenizer.save_pretrained(output / BASE_MODEL)
        transformers.set_seed(settings.seed)
        if settings.from_adapter is None:
            peft_model = get_peft_model(model, config)
        else:  # continue training a saved adapter
            from peft_kernel import PeftModelForCausalLM

            peft_model = PeftModelForCausalLM.from_pretrained(model, settings.from_adapter, is_trainable=True)
            config = peft_model.peft_config["default"]
        train_rows = data_mod.tokenize_all(train_examples, tokenizer, settings.max_length, data_name)
        eval_rows = data_mod.tokenize_all(eval_examples, tokenizer, settings.max_length, data_name)

        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        per_step = settings.batch_size * settings.grad_accum * world_size
        total_steps = settings.max_steps or max(1, math.ceil(settings.epochs * math.ceil(len(train_rows) / per_step)))
        eval_steps = settings.eval_steps or max(1, total_steps // 10)
        save_steps = settings.save_steps or eval_steps
        accelerator = _has_accelerator(torch)
        args = TrainingArguments(
            output_dir=str(output / CHECKPOINTS),
            per_device_train_batch_size=settings.batch_size,
            per_device_eval_batch_size=settings.batch_size,
            gradient_accumulation_steps=settings.grad_accum,
            learning_rate=settings.lr,
            num_train_epochs=settings.epochs,
            max_steps=settings.max_steps or -1,
            lr_scheduler_type="linear",
            weight_decay=0.0,
            seed=settings.seed,
            data_seed=settings.seed,
            logging_steps=1,
            eval_strategy="steps" if eval_rows else "no",
            eval_steps=eval_steps,
            # "before" is the Trainer's evaluation at the start of training, on the model as wrapped for
            # training: calling trainer.evaluate() before train() marks the model prepared, and accelerate
            # then never wraps it in DistributedDataParallel (each process would train on its own)
            eval_on_start=bool(eval_rows),
            save_strategy="steps",
            save_steps=save_steps,
            save_total_limit=2,
            # FSDP2: each rank holds a shard of the optimizer state, which the Trainer would save from rank 0 only
            save_only_model=settings.fsdp,
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=accelerator,
            # without use_cpu, accelerate does not see torchrun's CPU processes as distributed: each would train alone
            use_cpu=not accelerator,
            ddp_backend="gloo" if world_size > 1 and not accelerator else None,  # CPU processes talk over gloo
            ddp_find_unused_parameters=False,
            remove_unused_columns=False,
        )
        stale = output / CHECKPOINTS
        if checkpoint is None and int(os.environ.get("RANK", "0")) == 0 and stale.is_dir() and any(stale.iterdir()):
            # a fresh run replaces the folder's adapter; an earlier run's checkpoints would be rotated together
            # with this run's (by step number) and --resume would pick them up
            print(f"finetune: removing the checkpoints of an earlier run in {stale} (use --resume to continue it)",
                  file=sys.stderr)
            shutil.rmtree(stale)
        if settings.fsdp:
            peft_model = shard(peft_model, args, torch)
        first_eval = FirstEvaluation()
        trainer = Trainer(
            model=peft_model,
            args=args,
            train_dataset=train_rows,
            eval_dataset=eval_rows or None,
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
            processing_class=tokenizer,
            callbacks=[LiveProgress(enabled=not settings.no_progress), first_eval],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        rank0 = trainer.is_world_process_zero()

        train_start = time.perf_counter()
        trainer.train(resume_from_checkpoint=checkpoint)
        train_seconds = time.perf_counter() - train_start
        before = first_eval.metrics
        after = trainer.evaluate() if eval_rows else None
        trainer.save_model(str(output))  # rank 0 writes the adapter in HF PEFT's format

        steps, evals = _history(trainer.state.log_history)
        trainable, total = peft_model.get_nb_trainable_parameters()
        metrics: dict[str, Any] = {
            "method": record.peft_type.lower(),
            "model": model_name,
            "data": data_name,
            "output": str(output),
            "world_size": trainer.args.world_size,
            "parallel_mode": str(getattr(trainer.args.parallel_mode, "value", trainer.args.parallel_mode)),
            "rank": trainer.args.process_index,
            "device": str(trainer.args.device),
            "train_examples": len(train_rows),
            "eval_examples": len(eval_rows),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "peft_config": {k: v for k, v in config.to_dict().items() if v not in (None, [], {})},
            "options": {o.key: getattr(settings, o.key) for o in OPTIONS},
            "global_step": trainer.state.global_step,
            "resumed_from": checkpoint,
            "steps": steps,
            "eval": {
                "before": {"loss": float(before["eval_loss"])} if before else None,
                "after": {"loss": float(after["eval_loss"])} if after else None,
                "history": evals,
            },
            "seconds": {"train": train_seconds, "total": time.perf_counter() - start},
            "base_model_saved": settings.embedded,
            "fsdp": settings.fsdp,
        }
        if rank0:
            _write_json(output / METRICS, metrics)
            plot_losses(metrics, output / PLOT)
        return metrics
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
        torch.set_num_threads(threads)
