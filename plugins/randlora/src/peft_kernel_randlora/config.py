"""``RandLoraConfig``: HF PEFT's field names, order, defaults and checks.

No ``from __future__ import annotations``: the core's converter reads these annotations as types.
"""

import warnings
from typing import Literal, Optional, Union

import attrs

from peft_kernel.plugin_api import MAX_SIZE, ConfigError, PeftType, TargetedConfig, check_range


@attrs.define(kw_only=True)
class RandLoraConfig(TargetedConfig):
    """RandLora (https://huggingface.co/papers/2502.00987): each targeted linear layer of shape
    ``[M, m]`` (``m`` its smaller side) gains the full-rank update
    ``(randlora_alpha / r) * sum_i B_i diag(lambda[:, i]) A diag(gamma[i])`` over ``n = ceil(m / r)``
    bases, where the frozen random bases ``A`` [r, 1, m] and ``B`` [M, n, r] are shared by every
    layer of the model (drawn from ``projection_prng_key``, sized for the largest layer, sliced per
    layer; ternary with ``sparse`` / ``very_sparse``; ``B_i`` is every ``n``-th column of
    ``B.reshape(M, n * r)`` from column ``i``) and only ``randlora_lambda`` [r, n] and
    ``randlora_gamma`` [n, m] train. Every RandLora adapter of one model must have the same ``r``,
    ``projection_prng_key``, ``save_projection``, ``sparse`` and ``very_sparse``."""

    peft_type: Optional[Union[PeftType, str]] = "RANDLORA"
    exclude_modules: Optional[Union[list[str], set[str], str]] = attrs.field(default=None, init=False)
    """HF PEFT's ``RandLoraConfig`` has no ``exclude_modules``: not an argument, not in ``to_dict``
    (so HF's ``RandLoraConfig(**our_dict)`` works), and dropped with a warning when a file carries it."""
    r: int = 32
    projection_prng_key: int = 0
    save_projection: bool = True
    sparse: bool = False
    very_sparse: bool = False
    randlora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    randlora_alpha: Union[int, float] = 640
    bias: Literal["none", "all", "randlora_only"] = "none"
    init_weights: bool = True  # True: randlora_lambda starts at zero, so the adapter starts as the identity

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        check_range("RandLoraConfig", "r", self.r, 1, MAX_SIZE)
        if not 0.0 <= self.randlora_dropout <= 1.0:
            raise ConfigError(f"RandLoraConfig.randlora_dropout must be in [0, 1], got {self.randlora_dropout}")
        if not self.save_projection:
            warnings.warn(
                "RandLoraConfig.save_projection=False: randlora_A and randlora_B are left out of checkpoints and "
                "rebuilt from projection_prng_key on load, which may not reproduce them on every system and torch "
                "version; set save_projection=True to guarantee an exact restore.", UserWarning, stacklevel=3)
