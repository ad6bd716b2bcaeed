"""``apply_peft``: QEfficient's fine-tuning entry to PEFT, on peft-kernel.

``train_config`` is any object (dataclass, namespace) or mapping with:

- ``use_peft`` (default True): False returns the model untouched;
- ``from_peft_checkpoint`` (default None): a saved adapter to resume training from;
- ``peft_config_file`` (default None): a YAML or JSON file with LoRA settings; else
- QEfficient's defaults: ``r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"],
  lora_dropout=0.05, bias="none", task_type="CAUSAL_LM"``;
- ``peft_method`` (default ``"lora"``): only LoRA is provided here.

Keyword arguments override fields of the generated LoRA config.

Training itself is ``peft-kernel finetune`` (the ``peft-kernel-finetune`` plugin: transformers'
Trainer, torchrun for several processes), not a second loop: :func:`finetune_options` maps
QEfficient's ``train_config`` onto that command's options, :func:`run_finetune` runs it, and
``python -m peft_kernel_qaic.finetune`` takes QEfficient's flags on the command line::

    python -m peft_kernel_qaic.finetune --model_name meta-llama/Llama-3.2-1B --data train.jsonl \
        --peft_config_file lora.yaml --num_epochs 1 --lr 3e-4 --output_dir out
    torchrun --nproc_per_node=2 -m peft_kernel_qaic.finetune ...          # QEfficient's enable_ddp

========================  ===================================================================
QEfficient                ``peft-kernel finetune``
========================  ===================================================================
``use_peft``              must be true (full fine-tuning is not a PEFT job)
``peft_method``           ``--method``
``peft_config_file``      the method's fields (``--peft``); without it QEfficient's LoRA defaults
``from_peft_checkpoint``  ``--from-adapter`` (train a saved adapter further)
``model_name``            ``--model``
``dataset``               ``--data`` when it names a file (QEfficient's named datasets are not bundled)
``batch_size_training``   ``--batch-size``
``gradient_accumulation_steps``  ``--grad-accum``
``num_epochs`` / ``max_train_step``  ``--epochs`` / ``--max-steps`` (0: no limit)
``lr``, ``seed``          ``--lr``, ``--seed``
``context_length``        ``--max-length``
``run_validation``        false: ``--eval-split 0``
``output_dir``            ``--output``
========================  ===================================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from peft_kernel.plugin_api import ConfigError, read_settings_file

DEFAULT_LORA = {
    "r": 8,
    "lora_alpha": 32,
    "target_modules": ["q_proj", "v_proj"],
    "lora_dropout": 0.05,
    "bias": "none",
    "task_type": "CAUSAL_LM",
    "inference_mode": False,
}


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def load_peft_config_file(path: str | Path) -> dict[str, Any]:
    """Read a LoRA config from ``.yaml`` / ``.yml`` (needs PyYAML) or ``.json``."""
    return read_settings_file(path, f"peft_config_file {path}")


def generate_peft_config(train_config: Any, **overrides: Any):
    """The :class:`LoraConfig` ``apply_peft`` uses (file, else QEfficient's defaults, then overrides)."""
    from peft_kernel import LoraConfig  # through the registry: LoRA is a dependency, not an import

    method = str(_get(train_config, "peft_method", "lora") or "lora").lower()
    if method != "lora":
        raise ConfigError(f"peft_method {method!r} is not supported by apply_peft; use 'lora'")
    path = _get(train_config, "peft_config_file")
    settings = dict(DEFAULT_LORA) if not path else load_peft_config_file(path)
    settings.pop("peft_type", None)
    settings.update(overrides)
    settings.setdefault("task_type", "CAUSAL_LM")
    return LoraConfig.from_dict(settings, source=str(path) if path else "apply_peft")


def apply_peft(model: Any, train_config: Any, **kwargs: Any):
    """Wrap ``model`` for LoRA fine-tuning as QEfficient's finetune does; returns the model to train."""
    if not _get(train_config, "use_peft", True):
        return model
    checkpoint = _get(train_config, "from_peft_checkpoint")
    if checkpoint:
        from peft_kernel import PeftModel

        peft_model = PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
    else:
        from peft_kernel import get_peft_model

        peft_model = get_peft_model(model, generate_peft_config(train_config, **kwargs))
    if _get(train_config, "print_trainable_parameters", True):
        peft_model.print_trainable_parameters()
    return peft_model


# ---- training: QEfficient's train_config onto `peft-kernel finetune` ----------------------------
_SIMPLE = {  # QEfficient field -> finetune option (same meaning)
    "model_name": "model",
    "batch_size_training": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "num_epochs": "epochs",
    "lr": "lr",
    "seed": "seed",
    "context_length": "max_length",
    "output_dir": "output",
    "from_peft_checkpoint": "from_adapter",
    "peft_method": "method",
}


def finetune_options(train_config: Any, **overrides: Any) -> dict[str, Any]:
    """``peft-kernel finetune``'s options (Python keywords, ``peft`` a dict) for QEfficient's
    ``train_config`` (object or mapping); ``overrides`` are finetune options that win."""
    if not _get(train_config, "use_peft", True):
        raise ConfigError("use_peft=False asks for full fine-tuning, which peft-kernel finetune does not do; "
                          "train an adapter (use_peft=True) or use transformers' Trainer directly")
    options: dict[str, Any] = {}
    for field, option in _SIMPLE.items():
        value = _get(train_config, field)
        if value not in (None, ""):
            options[option] = value
    steps = _get(train_config, "max_train_step")
    if steps:
        options["max_steps"] = int(steps)
    if _get(train_config, "run_validation", True) is False:
        options["eval_split"] = 0.0
    dataset = _get(train_config, "dataset") or _get(train_config, "data")
    if dataset:
        if not Path(str(dataset)).is_file():
            raise ConfigError(f"dataset {dataset!r}: QEfficient's named datasets are not bundled; pass a JSONL, CSV or "
                              "text file (see `peft-kernel finetune --help`)")
        options["data"] = str(dataset)
    method = str(options.get("method", "lora")).lower()
    if not options.get("from_adapter"):
        path = _get(train_config, "peft_config_file")
        if path:
            fields = load_peft_config_file(path)
            fields.pop("peft_type", None)
        elif method == "lora":
            fields = {k: v for k, v in DEFAULT_LORA.items() if k != "inference_mode"}
        else:
            fields = {}
        if fields:
            options["peft"] = fields
    options.update(overrides)
    return options


def run_finetune(train_config: Any, **overrides: Any) -> dict[str, Any]:
    """Train as QEfficient's ``finetune`` would, with ``peft-kernel finetune``; returns its metrics."""
    try:
        from peft_kernel_finetune import finetune
    except ImportError:
        raise ConfigError("training needs the peft-kernel-finetune plugin: pip install 'peft-kernel-qaic[finetune]'") from None
    return finetune(**finetune_options(train_config, **overrides))


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def main(argv: list[str] | None = None) -> int:
    """``python -m peft_kernel_qaic.finetune`` with QEfficient's flag names."""
    import argparse
    import sys

    from peft_kernel.plugin_api import CliError, PeftKernelError

    parser = argparse.ArgumentParser(prog="python -m peft_kernel_qaic.finetune",
                                     description="QEfficient's finetune flags, trained by `peft-kernel finetune`.")
    parser.add_argument("--use_peft", type=_bool, nargs="?", const=True, default=True)
    parser.add_argument("--run_validation", type=_bool, nargs="?", const=True, default=True)
    for name, kind in (("model_name", str), ("peft_method", str), ("peft_config_file", str), ("from_peft_checkpoint", str),
                       ("dataset", str), ("data", str), ("batch_size_training", int), ("gradient_accumulation_steps", int),
                       ("num_epochs", float), ("max_train_step", int), ("lr", float), ("seed", int),
                       ("context_length", int), ("output_dir", str)):
        parser.add_argument(f"--{name}", type=kind, default=None)
    args = parser.parse_args(argv)
    try:
        metrics = run_finetune(vars(args))
    except (CliError, PeftKernelError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    if metrics.get("rank", 0) == 0:
        from peft_kernel_finetune.job import summary

        print(summary(metrics))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
