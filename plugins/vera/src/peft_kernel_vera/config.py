"""``VeraConfig``: HF PEFT's field names, order, defaults and checks.

No ``from __future__ import annotations``: the core's converter reads these annotations as types.
"""

import warnings
from typing import Literal, Optional, Union

import attrs

from peft_kernel.plugin_api import MAX_SIZE, ConfigError, PeftType, TargetedConfig, check_range


@attrs.define(kw_only=True)
class VeraConfig(TargetedConfig):
    """VeRA (https://huggingface.co/papers/2310.11454): each targeted linear layer gains
    ``delta W = diag(vera_lambda_b) B diag(vera_lambda_d) A``, where ``A`` [r, in] and ``B`` [out, r]
    are frozen random projections shared by every layer of the model (drawn from
    ``projection_prng_key``, sized for the largest layer, sliced per layer) and only the vectors
    ``vera_lambda_b`` [out] and ``vera_lambda_d`` [r] train. Every VeRA adapter of one model must
    have the same ``r``, ``projection_prng_key`` and ``save_projection``."""

    peft_type: Optional[Union[PeftType, str]] = "VERA"
    exclude_modules: Optional[Union[list[str], set[str], str]] = attrs.field(default=None, init=False)
    """HF PEFT's ``VeraConfig`` has no ``exclude_modules``: not an argument, not in ``to_dict`` (so
    HF's ``VeraConfig(**our_dict)`` works), and dropped with a warning when a file carries it."""
    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "vera_only"] = "none"
    init_weights: bool = True  # True: vera_lambda_b starts at zero, so the adapter starts as the identity

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        check_range("VeraConfig", "r", self.r, 1, MAX_SIZE)
        if not 0.0 <= self.vera_dropout <= 1.0:
            raise ConfigError(f"VeraConfig.vera_dropout must be in [0, 1], got {self.vera_dropout}")
        if not self.save_projection:
            warnings.warn(
                "VeraConfig.save_projection=False: vera_A and vera_B are left out of checkpoints and rebuilt from "
                "projection_prng_key on load, which may not reproduce them on every system and torch version; "
                "set save_projection=True to guarantee an exact restore.", UserWarning, stacklevel=3)
