"""``LoraGAConfig`` (HF PEFT's name, fields and defaults) and the ``LoraConfig`` rules around it. Cheap to import."""

from __future__ import annotations

from typing import Any, Optional

import attrs

from peft_kernel.plugin_api import ConfigError
from peft_kernel_lora.sub_config import sub_config

DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
"""Which of the gradient's first ``2r`` singular directions go to A and which to B: ``ArBr``
interleaves them (B the even, A the odd ones), ``A2rBr`` gives B the first ``r`` and A the next
``r``, ``ArB2r`` the reverse, ``random`` the same random ``r`` of the ``2r`` for both factors
(as HF PEFT 0.21.2 does: B·A is then part of the gradient's own decomposition)."""
SCALES = ("stable", "unit", "gd", "weight_svd")
"""How B is scaled (A has unit rows): ``stable`` by ``m**0.25 / sqrt(stable_gamma)`` (``m`` the stored
weight's first dimension: out_features, in_features for Conv1D),
``unit`` and ``gd`` not at all (HF PEFT 0.21.2 scales "gd" as "unit"), ``weight_svd`` from the
base weight's spectrum."""
NOT_IMPLEMENTED = {"scale": ("weight_svd",)}
"""Accepted by the config, refused when an adapter is initialised (their numbers could not be
reproduced from HF PEFT's behaviour)."""
MISSING = ("If you want to use LoRA-GA, please initialize the LoraConfig with init_lora_weights='lora_ga' and "
           "lora_ga_config=LoraGAConfig(...).")


@attrs.define(kw_only=True)
class LoraGAConfig:
    """LoRA-GA (gradient-aligned initialisation): the adapter starts on the leading singular
    directions of the weight gradient estimated by :func:`peft_kernel_lora.lora_ga.preprocess_loraga`.
    ``direction`` splits them between A and B (see :data:`DIRECTIONS`), ``scale`` scales B (see
    :data:`SCALES`), ``stable_gamma`` (> 0) is the ``gamma`` of ``scale="stable"``. HF PEFT accepts
    any ``direction`` / ``scale`` (and fails later, or ignores an unknown scale); this class names them at once."""

    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: float = 16

    def __attrs_post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"LoraGAConfig.direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.scale not in SCALES:
            raise ConfigError(f"LoraGAConfig.scale must be one of {SCALES}, got {self.scale!r}")
        gamma = self.stable_gamma
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma < float("inf"):
            raise ConfigError(f"LoraGAConfig.stable_gamma must be a positive number, got {gamma!r}")


def lora_ga_settings(value: Any) -> LoraGAConfig:
    """``LoraConfig.lora_ga_config`` (a dict, as saved, or a :class:`LoraGAConfig`) checked; ``None``
    is HF's ValueError."""
    if value is None:
        raise ValueError(MISSING)
    return sub_config(value, LoraGAConfig, "lora_ga_config")


def check_lora_ga(lora_ga_config: Any) -> Optional[dict]:
    """``lora_ga_config`` checked and as a dict (how it is saved), or ``None``. Like HF PEFT, a
    config without ``init_lora_weights="lora_ga"`` is kept and unused, and ``"lora_ga"`` without a
    config fails when the adapter is created."""
    return None if lora_ga_config is None else attrs.asdict(lora_ga_settings(lora_ga_config))
