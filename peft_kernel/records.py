"""Typed records that plugins hand to the core when they register methods and backends."""

from __future__ import annotations

from typing import Any, Mapping

import attrs

CAPABILITIES = frozenset({"mergeable", "mixed_batch", "hotswap", "prompt_learning", "multi_adapter"})
"""Capabilities a method may declare. The conformance suite runs the checks they allow."""


def _check_capabilities(instance: Any, attribute: attrs.Attribute, value: frozenset[str]) -> None:
    unknown = set(value) - CAPABILITIES
    if unknown:
        raise ValueError(f"unknown capabilities {sorted(unknown)}; known: {sorted(CAPABILITIES)}")


@attrs.frozen
class MethodRecord:
    """What a plugin tells the core about one PEFT method.

    ``peft_type`` is the string stored in ``adapter_config.json``; ``config_class`` the attrs
    config class (a :class:`peft_kernel.config.PeftConfig` subclass); ``prefix`` the substring
    that marks this method's parameters in state dicts (``"lora_"``); ``tuner_name`` the class
    name users see for ``peft_model.base_model`` (``"LoraModel"``); ``default_target_modules``
    maps a transformers ``model_type`` to the modules targeted when the config names none.
    """

    peft_type: str
    config_class: type
    prefix: str
    capabilities: frozenset[str] = attrs.field(converter=frozenset, default=frozenset(), validator=_check_capabilities)
    tuner_name: str = ""
    default_target_modules: Mapping[str, list[str]] = attrs.field(factory=dict)
    exports: Mapping[str, str] = attrs.field(factory=dict)
    """Extra public names, ``{"LoraModel": "peft_kernel_lora.tuner:LoraModel"}``, importable
    from ``peft_kernel`` while the plugin is installed. Imported on first access only."""
    distribution: str = ""
    """Filled in by the manager: the distribution (or plugin name) that registered the record."""

    def supports(self, capability: str) -> bool:
        return capability in self.capabilities


@attrs.frozen
class BackendRecord:
    """What a plugin tells the core about an execution backend (export / compile / run)."""

    name: str
    description: str
    exports: Mapping[str, str] = attrs.field(factory=dict)
    distribution: str = ""
