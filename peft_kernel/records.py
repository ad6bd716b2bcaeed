"""Typed records that plugins hand to the core when they register methods and backends."""

from __future__ import annotations

from typing import Any, Mapping

import attrs

CAPABILITIES = frozenset(
    {"mergeable", "mixed_batch", "hotswap", "prompt_learning", "multi_adapter", "additive", "task_ids"}
)
"""Capabilities a method may declare. The conformance suite runs the checks they allow.

``additive``: the adapter changes a weight by a fixed ``delta_weight`` (``W' = W + ΔW``, as LoRA,
LoHa, VeRA...), so it can be rewritten as a LoRA (``convert_to_lora``). Multiplicative and
orthogonal methods (IA3, OFT, BOFT, HRA, RoAd) do not declare it: their change scales or rotates
``W`` (``W' = W·R``), and ``convert_to_lora`` refuses them with a ``TypeError``.

``task_ids``: the method's layers compute per task: its tuner takes the ``task_ids`` argument of
``forward`` / ``generate`` (one task per row) and publishes them for the forward's duration, where
layers read them with :func:`peft_kernel.routing.current_task_ids`."""


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
    name users see for ``peft_model.base_model`` (``"LoraModel"``), which the core generates and
    exports as ``peft_kernel.<tuner_name>``; ``default_target_modules`` maps a transformers
    ``model_type`` to the modules targeted when the config names none (the key ``"*"`` for every
    other model type; a default may be ``"all-linear"``); ``layer_factory`` builds the
    method's adapter layers (see below).
    """

    peft_type: str
    config_class: type
    prefix: str
    capabilities: frozenset[str] = attrs.field(converter=frozenset, default=frozenset(), validator=_check_capabilities)
    tuner_name: str = ""
    default_target_modules: Mapping[str, list[str] | str] = attrs.field(factory=dict)
    layer_factory: str = ""
    """``"package.module:function"``, imported on first use: the function
    ``(config, adapter_name, base_layer, module_name) -> AdapterLayer | None`` that the core's default
    ``peft_kernel_create_layer`` calls for configs of ``config_class``; ``None`` means the layer type
    is not supported. Empty for methods that add no layers (or build them in their own hook)."""
    tuner_mixin: str = ""
    """``"package.module:Class"``, imported on first use: a class whose methods the generated
    ``tuner_name`` class gains, for HF PEFT's method-specific tuner API
    (``VBLoRAModel.get_nb_savable_parameters``). Its methods see the tuner as ``self``
    (``self.model``, ``self.peft_config``). Empty for most methods."""
    exports: Mapping[str, str] = attrs.field(factory=dict)
    """Extra public names, ``{"LoraLayer": "peft_kernel_lora.layers:LoraLayer"}``, importable
    from ``peft_kernel`` while the plugin is installed. Imported on first access only. (The config
    class and the ``tuner_name`` class are exported without being listed.)"""
    call_keywords: frozenset[str] = attrs.field(converter=frozenset, default=frozenset())
    """Keyword arguments of ``forward`` / ``generate`` that the method's layers read (aLoRA's
    ``alora_offsets``): the tuner takes them out of the call and publishes them with the call's
    other arguments (:func:`peft_kernel.call_scope.current_call`)."""
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
