"""``apply_peft``: QEfficient's fine-tuning entry to PEFT, on peft-kernel.

``train_config`` is any object (dataclass, namespace) or mapping with:

- ``use_peft`` (default True): False returns the model untouched;
- ``from_peft_checkpoint`` (default None): a saved adapter to resume training from;
- ``peft_config_file`` (default None): a YAML or JSON file with LoRA settings; else
- QEfficient's defaults: ``r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"],
  lora_dropout=0.05, bias="none", task_type="CAUSAL_LM"``;
- ``peft_method`` (default ``"lora"``): only LoRA is provided here.

Keyword arguments override fields of the generated LoRA config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from peft_kernel.errors import ConfigError

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
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"peft_config_file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(
                f"{path} is YAML, which needs PyYAML: pip install 'peft-kernel-qaic[yaml]' (or use a .json file)"
            ) from None
        data = yaml.safe_load(text)
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    else:
        raise ConfigError(f"peft_config_file must be .yaml, .yml or .json, got {path.name}")
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of LoRA settings, got {type(data).__name__}")
    return data


def generate_peft_config(train_config: Any, **overrides: Any):
    """The :class:`LoraConfig` ``apply_peft`` uses (file, else QEfficient's defaults, then overrides)."""
    from peft_kernel_lora.config import LoraConfig

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
        from peft_kernel.model import PeftModel

        peft_model = PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
    else:
        from peft_kernel.mapping import get_peft_model

        peft_model = get_peft_model(model, generate_peft_config(train_config, **kwargs))
    if _get(train_config, "print_trainable_parameters", True):
        peft_model.print_trainable_parameters()
    return peft_model
