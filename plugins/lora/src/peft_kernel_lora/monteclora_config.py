"""``MontecloraConfig`` (HF PEFT's name, fields, defaults and errors) and its ``LoraConfig`` rules. Cheap to import."""

from __future__ import annotations

import math
from typing import Any, Optional

import attrs

from peft_kernel.plugin_api import ConfigError
from peft_kernel_lora.sub_config import sub_config


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


@attrs.define(kw_only=True)
class MontecloraConfig:
    """MonteCLoRA (Monte Carlo LoRA): variational, sampled perturbations of the adapter while training.

    ``num_samples`` Monte Carlo samples per forward, mixed by Dirichlet(``dirichlet_prior``) expert
    weights; ``sample_scaler`` scales the perturbations; ``kl_loss_weight`` weighs the KL term of the
    variational loss, ``use_entropy`` adds an entropy term; ``buffer_size`` samples are drawn ahead.
    HF PEFT checks the first three counts only; this class also refuses non-integer counts and
    negative or non-finite weights, naming the field."""

    num_samples: int = 8
    use_entropy: bool = False
    dirichlet_prior: float = 0.1
    sample_scaler: float = 1e-4
    kl_loss_weight: float = 1e-5
    buffer_size: int = 150

    def __attrs_post_init__(self) -> None:
        for name in ("num_samples", "buffer_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"MontecloraConfig.{name}: `{name}` must be greater than 0 (an integer), got {value!r}.")
        if not _number(self.dirichlet_prior) or self.dirichlet_prior <= 0:
            raise ConfigError(f"MontecloraConfig.dirichlet_prior: `dirichlet_prior` must be greater than 0, got "
                              f"{self.dirichlet_prior!r}.")
        for name in ("sample_scaler", "kl_loss_weight"):
            value = getattr(self, name)
            if not _number(value) or value < 0:
                raise ConfigError(f"MontecloraConfig.{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.use_entropy, bool):
            raise ConfigError(f"MontecloraConfig.use_entropy must be True or False, got {self.use_entropy!r}")


def monteclora_settings(value: Any) -> MontecloraConfig:
    """``LoraConfig.monteclora_config`` (a dict, as saved, or a :class:`MontecloraConfig`) checked."""
    return sub_config(value, MontecloraConfig, "monteclora_config")


def check_lora_monteclora(monteclora_config: Any, others: dict[str, Any]) -> Optional[dict]:
    """``monteclora_config`` checked and as a dict (how it is saved), or ``None``; not with the LoRA
    variants in ``others`` (``{field: value}``: DoRA, VeLoRA, aLoRA), which HF PEFT refuses as a
    variant combination when the adapter is injected."""
    if monteclora_config is None:
        return None
    for field, value in others.items():
        if value:
            raise ConfigError(f"LoraConfig.monteclora_config cannot be combined with {field}={value!r} (HF PEFT: "
                              "invalid or unsupported variant combination)")
    return attrs.asdict(monteclora_settings(monteclora_config))
