"""``get_peft_model`` and ``inject_adapter_in_model``: HF PEFT's two entry points."""

from __future__ import annotations

from typing import Any

from torch import nn

from peft_kernel.config import PeftConfig
from peft_kernel.injection import check_adapter_name, inject, set_trainable
from peft_kernel.model import TASK_CLASSES, PeftModel
from peft_kernel.plugins import get_registry

CONFIGS_ATTR = "_peft_kernel_configs"


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap ``model`` with a new adapter; the ``PeftModelFor*`` class follows ``peft_config.task_type``."""
    if mixed:
        raise NotImplementedError("mixed adapter types (PeftMixedModel) are not supported yet; use one method per model.")
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if peft_config.base_model_name_or_path is None and name_or_path:
        peft_config.base_model_name_or_path = name_or_path
    if revision is not None:
        peft_config.revision = revision
    return TASK_CLASSES.get(peft_config.task_type, PeftModel)(model, peft_config, adapter_name)


def inject_adapter_in_model(
    peft_config: PeftConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, Any] | None = None,
) -> nn.Module:
    """Inject adapter layers into ``model`` in place, without a ``PeftModel`` wrapper."""
    configs: dict[str, PeftConfig] = model.__dict__.setdefault(CONFIGS_ATTR, {})
    registry = get_registry()
    check_adapter_name(adapter_name, configs, registry, peft_config)
    inject(model, peft_config, adapter_name, registry)
    configs[adapter_name] = peft_config
    set_trainable(model, [adapter_name], configs)
    return model
