"""``ArrowConfig`` (HF PEFT's name, fields and defaults) and how ``LoraConfig.arrow_config`` is read. Cheap to import."""

from __future__ import annotations

from typing import Any, Optional

import attrs

from peft_kernel.plugin_api import ConfigError
from peft_kernel_lora.sub_config import sub_config


def _names(field: str, value: Any) -> Optional[list[str]]:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or \
            not all(isinstance(n, str) for n in value):
        raise ConfigError(f"ArrowConfig.{field} must be a list of adapter names, got {value!r}")
    return list(value)


@attrs.define(kw_only=True)
class ArrowConfig:
    """Arrow routing (https://arxiv.org/abs/2405.11157) over LoRA experts, optionally after
    GenKnowSub (https://aclanthology.org/2025.acl-short.54/).

    Each token goes to the ``top_k`` experts whose prototype (the top right singular vector of
    the expert's ``B @ A``) has the largest ``|<x, prototype>|``; their outputs are mixed with a
    softmax of those scores divided by ``router_temperature``. ``use_gks`` first subtracts the mean
    of the general adapters' ``A`` and ``B`` from each task adapter's. ``task_adapter_names`` and
    ``gks_adapter_names`` are filled in by :func:`~peft_kernel_lora.arrow_model.create_arrow_model`;
    ``rng_seed`` seeds the power iteration that finds the prototypes (the global RNG if ``None``)."""

    top_k: int = 3
    router_temperature: float = 1.0
    use_gks: bool = False
    task_adapter_names: Optional[list[str]] = None
    gks_adapter_names: Optional[list[str]] = None
    rng_seed: Optional[int] = None

    def __attrs_post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k <= 0:
            raise ConfigError(f"ArrowConfig.top_k must be a positive integer, got {self.top_k!r}")
        temperature = self.router_temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ConfigError(f"ArrowConfig.router_temperature must be greater than 0, got {temperature!r}")
        if not isinstance(self.use_gks, bool):
            raise ConfigError(f"ArrowConfig.use_gks must be a bool, got {self.use_gks!r}")
        if self.rng_seed is not None and (isinstance(self.rng_seed, bool) or not isinstance(self.rng_seed, int)):
            raise ConfigError(f"ArrowConfig.rng_seed must be an integer or None, got {self.rng_seed!r}")
        self.task_adapter_names = _names("task_adapter_names", self.task_adapter_names)
        self.gks_adapter_names = _names("gks_adapter_names", self.gks_adapter_names)


def arrow_settings(value: Any) -> Optional[ArrowConfig]:
    """``LoraConfig.arrow_config`` (``None``, a dict as saved, or an :class:`ArrowConfig`) checked."""
    if value is None:
        return None
    return sub_config(value, ArrowConfig, "arrow_config")
