"""``KasaConfig`` (HF PEFT's name, fields and defaults) and the ``LoraConfig`` rules around it. Cheap to import."""

from __future__ import annotations

from typing import Any

import attrs

from peft_kernel.plugin_api import ConfigError
from peft_kernel_lora.sub_config import sub_config


@attrs.define(kw_only=True)
class KasaConfig:
    """KaSA (Knowledge-aware Singular-value Adaptation, arXiv:2412.06071): adding the adapter drops the
    ``r`` smallest singular components of each targeted base weight, and the update is
    ``scaling * B @ diag(lora_diag) @ A``. ``beta`` weighs the L2 penalty ``sum(lora_diag ** 2)`` and
    ``gamma`` the orthogonality penalty ``||BᵀB - I||_F + ||AAᵀ - I||_F`` of
    ``LoraModel._get_kasa_loss``, which the user adds to the task loss."""

    beta: float = 1e-4
    gamma: float = 1e-3

    def __attrs_post_init__(self) -> None:
        for name in ("beta", "gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"KasaConfig.{name} must be a number, got {value!r}")
            if not value >= 0:
                raise ConfigError(f"KasaConfig.{name} must be non-negative, got {value!r}.")


def kasa_settings(value: Any) -> KasaConfig:
    """``LoraConfig.kasa_config`` (a dict, as saved, or a :class:`KasaConfig`) checked."""
    return sub_config(value, KasaConfig, "kasa_config")


def check_lora_kasa(config: Any) -> dict | None:
    """``kasa_config`` as a dict (the saved form), refused with the options it cannot be combined with:
    DoRA, aLoRA and BD-LoRA (HF refuses these when the adapter is injected), ``fan_in_fan_out``
    (HF: Conv1D layers), and initialisations that rewrite the base weight (PiSSA, OLoRA, LoftQ,
    CorDA: HF runs both, each on the other's weight; here refused rather than guessed)."""
    if config.kasa_config is None:
        return None
    settings = attrs.asdict(kasa_settings(config.kasa_config))
    for field, value, why in (
        ("use_dora", config.use_dora, "DoRA"),
        ("alora_invocation_tokens", config.alora_invocation_tokens, "aLoRA"),
        ("use_bdlora", config.use_bdlora, "BD-LoRA"),
        ("fan_in_fan_out", config.fan_in_fan_out, "fan_in_fan_out layers (e.g. Conv1D); target nn.Linear layers"),
    ):
        if value:
            raise ConfigError(f"LoraConfig.kasa_config cannot be combined with {field}={value!r} ({why}).")
    init = config.init_lora_weights
    if isinstance(init, str) and init not in ("gaussian", "eva", "orthogonal"):
        raise ConfigError(f"LoraConfig.kasa_config cannot be combined with init_lora_weights={init!r}: KaSA "
                          "truncates the base weight, which this initialisation rewrites too.")
    return settings
