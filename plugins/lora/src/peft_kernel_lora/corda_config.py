"""``CordaConfig`` (HF PEFT's name and fields) and the ``LoraConfig`` rules around it. Cheap to import."""

from __future__ import annotations

import warnings
from typing import Any, Literal, Optional

import attrs

from peft_kernel.plugin_api import ConfigError
from peft_kernel_lora.sub_config import sub_config

CORDA_METHODS = ("ipm", "kpm")
"""``ipm``: the adapter takes the largest context-oriented components (instruction-previewed mode);
``kpm``: the smallest (knowledge-preserved mode)."""


@attrs.define(kw_only=True)
class CordaConfig:
    """How :func:`peft_kernel_lora.corda.preprocess_corda` builds CorDA adapters.

    ``cache_file``: where the per-layer decompositions are saved, and loaded from when it exists;
    ``covariance_file``: the same for the input covariances (skips calibration when present);
    ``use_float16_for_covariance``: accumulate covariances in the inputs' own precision (half for a
    half-precision model) instead of float32;
    ``prune_temporary_fields``: drop the covariances from the modules once decomposed;
    ``verbose``: show a progress bar over the decomposed layers.
    HF PEFT accepts any ``corda_method``; this class names the field at once."""

    cache_file: Optional[str] = None
    covariance_file: Optional[str] = None
    corda_method: Literal["ipm", "kpm"] = "ipm"
    verbose: bool = False
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True

    def __attrs_post_init__(self) -> None:
        if self.corda_method not in CORDA_METHODS:
            raise ConfigError(f"CordaConfig.corda_method must be one of {CORDA_METHODS}, got {self.corda_method!r}")
        for name in ("cache_file", "covariance_file"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"CordaConfig.{name} must be a path string or None, got {type(value).__name__}")


def corda_settings(value: Any) -> CordaConfig:
    """``LoraConfig.corda_config`` (``None``, a dict, as saved, or a :class:`CordaConfig`) checked."""
    if value is None:
        return CordaConfig()
    return sub_config(value, CordaConfig, "corda_config")


def check_lora_corda(init_lora_weights: Any, corda_config: Any) -> Optional[dict]:
    """HF's rules for ``corda_config`` (the default one, with a warning, for ``init_lora_weights="corda"``
    without it; a warning when ``init_lora_weights`` is not "corda"); the config as a dict (how it is
    saved), or ``None``."""
    if corda_config is None:
        if init_lora_weights != "corda":
            return None
        warnings.warn("`init_lora_weights` is 'corda' but `corda_config` is not specified. Using default CorDA config.",
                      stacklevel=4)
        return attrs.asdict(CordaConfig())
    if init_lora_weights != "corda":
        warnings.warn("`corda_config` specified but will be ignored when `init_lora_weights` is not 'corda'.",
                      stacklevel=4)
    return attrs.asdict(corda_settings(corda_config))
