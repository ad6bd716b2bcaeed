"""``VeloraConfig`` (HF PEFT's name, fields, defaults and errors) and its ``LoraConfig`` rules. Cheap to import."""

from __future__ import annotations

from typing import Any, Optional

import attrs

from peft_kernel.plugin_api import ConfigError
from peft_kernel_lora.sub_config import sub_config

INIT_TYPES = ("batch_average_once", "batch_average", "random")
"""How the projection vector is set: from the mean (over tokens and groups) of the training
inputs, at every training forward or at the first only, or a random unit vector at creation."""


@attrs.define(kw_only=True)
class VeloraConfig:
    """VeLoRA (memory-efficient training): the input of ``lora_A`` is kept for the backward pass
    compressed to one number per group of ``in_features / num_groups`` features (its projection on
    a unit vector), ``scale`` multiplies the reconstructed input; ``init_type`` (see
    :data:`INIT_TYPES`) sets the vector. The forward is LoRA's; only ``lora_A``'s gradient changes."""

    num_groups: int = 64
    scale: float = 1.0
    init_type: str = "batch_average"

    def __attrs_post_init__(self) -> None:
        if isinstance(self.num_groups, bool) or not isinstance(self.num_groups, int) or self.num_groups <= 0:
            raise ConfigError(f"VeloraConfig.num_groups: `num_groups` should be positive, got {self.num_groups!r}.")
        scale = self.scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
            raise ConfigError(f"VeloraConfig.scale: `scale` should be positive, got {scale!r}.")
        if self.init_type not in INIT_TYPES:
            raise ConfigError(f"VeloraConfig.init_type: Unsupported `init_type` {self.init_type!r}. Supported values "
                              "are 'batch_average_once', 'batch_average', and 'random'.")


def velora_settings(value: Any) -> VeloraConfig:
    """``LoraConfig.velora_config`` (a dict, as saved, or a :class:`VeloraConfig`) checked."""
    return sub_config(value, VeloraConfig, "velora_config")


def check_lora_velora(velora_config: Any, use_dora: bool, alora_invocation_tokens: Any) -> Optional[dict]:
    """``velora_config`` checked and as a dict (how it is saved), or ``None``; not with DoRA or aLoRA
    (HF PEFT refuses these variant combinations when the adapter is injected)."""
    if velora_config is None:
        return None
    for field, value in (("use_dora", use_dora), ("alora_invocation_tokens", alora_invocation_tokens)):
        if value:
            raise ConfigError(f"LoraConfig.velora_config cannot be combined with {field}={value!r} (HF PEFT: "
                              "invalid or unsupported variant combination)")
    return attrs.asdict(velora_settings(velora_config))
