"""``MissConfig``: HF PEFT's field names, order, defaults and checks.

No ``from __future__ import annotations``: the core's converter reads these annotations as types.
"""

from typing import Literal, Optional, Union

import attrs

from peft_kernel.plugin_api import MAX_SIZE, ConfigError, PeftType, TargetedConfig, check_range

BIAS_CHOICES = ("none", "all", "miss_only")


@attrs.define(kw_only=True)
class MissConfig(TargetedConfig):
    """MiSS (Matrix Shard Sharing, https://huggingface.co/papers/2409.15371): one trainable block
    per targeted ``nn.Linear``, shared across the weight's shards.

    ``init_weights`` picks the variant: ``True`` (zero block, the adapter starts as the identity) or
    ``False`` (random block), both the default "balance" MiSS with a ``[r, out_features]`` block
    repeated along ``in_features``; ``"bat"`` the nonlinear Bat update of ``[r, r]`` weight blocks
    (needs both dimensions divisible by ``r``); ``"mini"`` a ``[r, mini_r]`` block repeated along
    both dimensions (needs ``out_features`` divisible by ``mini_r``).
    """

    peft_type: Optional[Union[PeftType, str]] = "MISS"
    r: int = 64
    miss_dropout: float = 0.0
    mini_r: int = 1
    init_weights: Union[bool, Literal["bat", "mini"]] = True
    bias: str = "none"

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        check_range("MissConfig", "r", self.r, 1, MAX_SIZE)
        if self.init_weights == "mini":
            check_range("MissConfig", "mini_r", self.mini_r, 1, MAX_SIZE, " (init_weights='mini')")
        if not 0.0 <= self.miss_dropout <= 1.0:
            raise ConfigError(f"MissConfig: $.miss_dropout must be a probability from 0 to 1, got {self.miss_dropout!r}")
        if self.bias not in BIAS_CHOICES:
            raise ConfigError(f"MissConfig: $.bias must be one of {list(BIAS_CHOICES)}, got {self.bias!r}")
