"""``EvaConfig`` (HF PEFT's name, fields and defaults) and the ``LoraConfig`` rules around it. Cheap to import."""

from __future__ import annotations

import warnings
from typing import Any

import attrs

from peft_kernel.plugin_api import ConfigError
from peft_kernel_lora.sub_config import sub_config


@attrs.define(kw_only=True)
class EvaConfig:
    """Data-driven EVA initialisation (Explained Variance Adaptation): ``rho`` (>= 1) caps a layer's
    rank at ``round(r * rho)``, ``tau`` is the cosine-similarity threshold at which the incremental
    SVD of a layer's inputs counts as converged, ``use_label_mask`` / ``label_mask_value`` drop the
    positions whose label is ``label_mask_value``, ``whiten`` divides each direction by the square
    root of its singular value, ``adjust_scaling_factors`` keeps ``lora_alpha / r`` unchanged when ranks move."""

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __attrs_post_init__(self) -> None:
        if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) or not self.rho >= 1.0:
            raise ConfigError(f"EvaConfig.rho must be >= 1.0, got {self.rho!r}")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"EvaConfig.tau must be between 0.0 and 1.0, got {self.tau!r}")
        if isinstance(self.label_mask_value, bool) or not isinstance(self.label_mask_value, int):
            raise ConfigError(f"EvaConfig.label_mask_value must be an integer, got {self.label_mask_value!r}")


def eva_settings(value: Any) -> EvaConfig:
    """``LoraConfig.eva_config`` (a dict, as saved, or an :class:`EvaConfig`) checked."""
    return sub_config(value, EvaConfig, "eva_config")


def check_lora_eva(init_lora_weights: Any, eva_config: Any) -> dict | None:
    """HF's rules for ``init_lora_weights="eva"`` and ``eva_config`` (same warnings); the config as a dict."""
    if init_lora_weights == "eva" and eva_config is None:
        warnings.warn("`init_lora_weights` is 'eva' but `eva_config` is not specified. Using default EVA config.",
                      stacklevel=3)
        return attrs.asdict(EvaConfig())
    if eva_config is None:
        return None
    if init_lora_weights != "eva":
        warnings.warn("`eva_config` specified but will be ignored when `init_lora_weights` is not 'eva'.", stacklevel=3)
    return attrs.asdict(eva_settings(eva_config))
