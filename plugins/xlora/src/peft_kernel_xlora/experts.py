"""The LoRA experts of an X-LoRA model: read from the folders (or Hub ids) of ``XLoraConfig.adapters``
and loaded into a LoRA tuner built by the installed LoRA plugin, through the core's registry.

As in HF PEFT the experts are named by their position (``"0"``, ``"1"``...), whatever the keys of
``adapters`` are. The positions follow the keys' sorted order, which is the order ``adapters`` has
once saved (``adapter_config.json`` is written with sorted keys, by HF PEFT too): a reloaded model
then gives each classifier output the expert it had (HF PEFT takes the dict's order, so a saved model
whose keys were not sorted reloads with its experts permuted). Every expert is read and checked before the model is touched; a failure while
they are injected gives the model back as it came.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peft_kernel.plugin_api import (
    AdapterHost,
    AdapterLayer,
    CheckpointError,
    ConfigError,
    PeftConfig,
    UnsupportedFeatureError,
    get_registry,
    load_adapter_weights,
    walk_modules,
)
from peft_kernel_xlora.config import XLoraConfig

EXPERT_METHOD = "LORA"


def _read_expert(key: str, path: str) -> tuple[PeftConfig, dict[str, Any]]:
    """The config and tensors of the expert ``key`` saved at ``path``."""
    where = f"XLoraConfig.adapters[{key!r}] ({path!r})"
    try:
        config = PeftConfig.from_pretrained(path)
        tensors = load_adapter_weights(path)
    except (OSError, ValueError) as exc:  # ConfigError and CheckpointError are ValueErrors
        raise CheckpointError(f"{where}: cannot load the LoRA expert: {exc}") from exc
    peft_type = str(getattr(config.peft_type, "value", config.peft_type)).upper()
    if peft_type != EXPERT_METHOD:
        raise ConfigError(f"{where}: X-LoRA experts must be LoRA adapters; this one is {peft_type}")
    if getattr(config, "modules_to_save", None):
        raise UnsupportedFeatureError(f"{where}: an expert with modules_to_save {sorted(config.modules_to_save)} "
                                      "cannot be mixed per token; X-LoRA mixes LoRA layers only")
    config.inference_mode = False
    return config, get_registry().map_state_dict(config, tensors, "load")


def load_experts(model: nn.Module, config: XLoraConfig) -> AdapterHost:
    """A LoRA tuner on ``model`` holding ``config.adapters`` as experts ``"0"``, ``"1"``..., all active."""
    if not config.adapters:
        raise ConfigError("XLoraConfig.adapters is empty: X-LoRA needs at least one LoRA expert ({name: path})")
    experts = [(str(i), *_read_expert(key, path)) for i, (key, path) in enumerate(sorted(config.adapters.items()))]
    registry = get_registry()
    tuner: AdapterHost | None = None
    try:
        for name, expert_config, tensors in experts:
            if tuner is None:
                tuner = registry.create_host(registry.method(EXPERT_METHOD), model, expert_config, name)
            else:
                tuner.add_adapter(name, expert_config)
            tuner.load_tensors(tensors, name)
        _check_layers(tuner.plain_model)
        tuner.set_adapter([name for name, _, _ in experts])
    except BaseException:
        if tuner is not None:
            tuner.release()
        raise
    return tuner


def _check_layers(model: nn.Module) -> None:
    """X-LoRA weights an expert per token: refuse layers whose output has no token axis (convolutions)."""
    for name, module in walk_modules(model):
        if isinstance(module, AdapterLayer) and isinstance(module.base_layer, nn.modules.conv._ConvNd):
            raise UnsupportedFeatureError(f"X-LoRA mixes experts per token; the expert layer {name!r} wraps a "
                                          f"{type(module.base_layer).__name__}, which X-LoRA does not support")


def expert_layers(model: nn.Module) -> list[AdapterLayer]:
    """The expert layers in module order: the index of each is its layer in the scalings."""
    return [module for _, module in walk_modules(model) if isinstance(module, AdapterLayer)]
