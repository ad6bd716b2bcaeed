"""The LoRA options that hold a config object of their own (``eva_config``, ``kasa_config``...):
given as that object or as the dict ``adapter_config.json`` saves, checked the same way for each."""

from __future__ import annotations

from typing import Any, TypeVar

import attrs

from peft_kernel.plugin_api import ConfigError

C = TypeVar("C")


def sub_config(value: Any, config_class: type[C], field: str) -> C:
    """``LoraConfig.<field>`` as a ``config_class``: taken as is, or built from a dict whose keys are
    all fields of ``config_class`` (an unknown key or another type is a :class:`ConfigError`)."""
    if isinstance(value, config_class):
        return value
    name = config_class.__name__
    if not isinstance(value, dict):
        article = "an" if name[0] in "AEIOU" else "a"
        raise ConfigError(f"LoraConfig.{field} must be {article} {name}, a dict, or None, got {type(value).__name__}")
    known = [f.name for f in attrs.fields(config_class)]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ConfigError(f"LoraConfig.{field} has unknown keys {unknown}; {name} has {', '.join(known)}")
    return config_class(**value)
