"""HF PEFT's entry points — ``get_peft_model``, ``inject_adapter_in_model``, ``get_peft_config`` — and
its lookup tables, which here read the plugin registry (``PEFT_TYPE_TO_CONFIG_MAPPING["LORA"]`` is
the installed LoRA plugin's config class)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterator

from torch import nn

from peft_kernel.config import PeftConfig
from peft_kernel.injection import CONFIGS_ATTR, check_adapter_name, inject, set_trainable
from peft_kernel.model import TASK_CLASSES, PeftModel
from peft_kernel.plugins import get_registry


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap ``model`` with a new adapter; the ``PeftModelFor*`` class follows ``peft_config.task_type``.
    With ``mixed=True`` a :class:`~peft_kernel.mixed_model.PeftMixedModel` (adapters of several methods).
    With ``autocast_adapter_dtype`` (default) adapter tensors on a float16/bfloat16 base are float32."""
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if peft_config.base_model_name_or_path is None and name_or_path:
        peft_config.base_model_name_or_path = name_or_path
    if revision is not None:
        peft_config.revision = revision
    if mixed:  # adapters of several methods on one model (HF PEFT's rule: no task class)
        from peft_kernel.mixed_model import PeftMixedModel

        return PeftMixedModel(model, peft_config, adapter_name=adapter_name)
    return TASK_CLASSES.get(peft_config.task_type, PeftModel)(
        model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )


def inject_adapter_in_model(
    peft_config: PeftConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, Any] | None = None,
) -> nn.Module:
    """Inject adapter layers into ``model`` in place, without a ``PeftModel`` wrapper. As in HF PEFT
    the adapter tensors keep the base layers' dtype (no float32 upcast), and a ``state_dict`` (its
    keys only) chooses the modules to adapt."""
    if peft_config.is_prompt_learning:
        raise ValueError("`create_and_replace` does not support prompt learning and adaption prompt yet.")
    configs: dict[str, PeftConfig] = model.__dict__.setdefault(CONFIGS_ATTR, {})
    registry = get_registry()
    check_adapter_name(adapter_name, configs, registry, peft_config)
    inject(model, peft_config, adapter_name, registry, state_dict_keys=state_dict)
    configs[adapter_name] = peft_config
    set_trainable(model, [adapter_name], configs)
    return model


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """The config object for a dict with a ``peft_type`` (HF PEFT's ``get_peft_config``); unknown
    keys are dropped with a warning and wrong types raise, as everywhere in peft-kernel."""
    return PeftConfig.from_dict(config_dict)


class _RegistryTable(Mapping):
    """A read-only ``{peft_type: value}`` view of the installed methods, current on every access."""

    def __init__(self, value: Callable[[Any], Any]) -> None:
        self._value = value

    def _table(self) -> dict[str, Any]:
        table = {}
        for peft_type, record in get_registry().methods.items():
            value = self._value(record)
            if value is not None:
                table[peft_type] = value
        return table

    def __getitem__(self, key: Any) -> Any:
        return self._table()[str(getattr(key, "value", key)).upper()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __repr__(self) -> str:
        return repr(self._table())


def _tuner(record: Any) -> Any:
    if record.supports("prompt_learning") or not record.tuner_name:
        return None
    from peft_kernel.tuner import tuner_class

    return tuner_class(record.tuner_name, record.tuner_mixin)


PEFT_TYPE_TO_CONFIG_MAPPING: Mapping[str, type[PeftConfig]] = _RegistryTable(lambda record: record.config_class)
"""``{peft_type: config class}`` of every installed method."""

PEFT_TYPE_TO_TUNER_MAPPING: Mapping[str, type] = _RegistryTable(_tuner)
"""``{peft_type: tuner class}`` (``LoraModel``...) of every installed layer-adapter method."""

MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[PeftModel]] = {
    str(getattr(task, "value", task)): cls for task, cls in TASK_CLASSES.items()
}
"""``{task_type: PeftModelFor*}``, as HF PEFT."""

PEFT_TYPE_TO_MIXED_MODEL_MAPPING: Mapping[str, type] = _RegistryTable(_tuner)
"""``{peft_type: tuner class}`` of the methods a ``PeftMixedModel`` can mix: every installed
layer-adapter method (prompt-learning methods add no layers and cannot be mixed)."""
