"""``LoftQConfig`` (HF PEFT's name and fields) and the ``LoraConfig`` rules around it. Cheap to import."""

from __future__ import annotations

import warnings
from typing import Any

import attrs

from peft_kernel.plugin_api import ConfigError
from peft_kernel_lora.sub_config import sub_config

LOFTQ_BITS = (4, 8)
"""Bit widths HF PEFT 0.21 quantises LoftQ base weights to (``nf4`` and ``int8``)."""


@attrs.define(kw_only=True)
class LoftQConfig:
    """How LoftQ quantises the base weights: ``loftq_bits`` (4: NF4, 8: int8) and ``loftq_iter``
    alternations of quantising and a rank-``r`` SVD of the residual (at least 1).

    HF PEFT accepts any values here and fails when the adapter is created; this class names the
    field at once."""

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __attrs_post_init__(self) -> None:
        if isinstance(self.loftq_bits, bool) or self.loftq_bits not in LOFTQ_BITS:
            raise ConfigError(
                f"LoftQConfig.loftq_bits must be one of {LOFTQ_BITS} (HF PEFT: 'Only nf4 and int8 quantization "
                f"is supported'), got {self.loftq_bits!r}"
            )
        if isinstance(self.loftq_iter, bool) or not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            raise ConfigError(f"LoftQConfig.loftq_iter must be an integer >= 1 (the number of iterations), "
                              f"got {self.loftq_iter!r}")


def loftq_settings(value: Any) -> LoftQConfig:
    """``LoraConfig.loftq_config`` (a dict, as saved, or a :class:`LoftQConfig`) checked."""
    return sub_config(value, LoftQConfig, "loftq_config")


def check_lora_loftq(init_lora_weights: Any, loftq_config: Any) -> dict:
    """HF's rules for ``init_lora_weights="loftq"`` and ``loftq_config``; the config as a dict."""
    if init_lora_weights == "loftq":
        if not loftq_config:
            raise ConfigError("`loftq_config` must be specified when `init_lora_weights` is 'loftq'.")
        return attrs.asdict(loftq_settings(loftq_config))
    if loftq_config:
        warnings.warn("`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.",
                      stacklevel=3)
        return attrs.asdict(loftq_settings(loftq_config))
    return {}
