"""``BOFTConfig`` with every field of HF PEFT's (0.21.2), same names and defaults.

No ``from __future__ import annotations`` here: the core's cattrs converter reads these
annotations as real types.
"""

from typing import Literal, Optional, Union

import attrs

from peft_kernel.plugin_api import MAX_SIZE, ConfigError, PeftType, TargetedConfig, check_range

BIAS_CHOICES = ("none", "all", "boft_only")
MAX_BUTTERFLY_FACTORS = 32
"""Factor ``m`` needs ``2**(m - 1)`` blocks: 32 factors already ask for 2**31 blocks."""


@attrs.define(kw_only=True)
class BOFTConfig(TargetedConfig):
    """Configuration of a BOFT adapter (HF PEFT's ``BOFTConfig``).

    Each targeted layer's weight is multiplied by an orthogonal matrix made of
    ``boft_n_butterfly_factor`` butterfly factors, each block-diagonal with ``boft_block_num``
    blocks of ``boft_block_size`` (give exactly one of the two; the other follows from the layer's
    input size, which must be divisible, as in HF PEFT), and each output is scaled by ``boft_s``.
    ``boft_dropout`` is multiplicative: in training, that share of one random factor's blocks is
    replaced by the identity. The targeting fields come from :class:`TargetedConfig`.
    """

    peft_type: Optional[Union[PeftType, str]] = PeftType.BOFT
    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "boft_only"] = "none"
    init_weights: bool = True

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        check_range("BOFTConfig", "boft_block_size", self.boft_block_size, 0, MAX_SIZE)
        check_range("BOFTConfig", "boft_block_num", self.boft_block_num, 0, MAX_SIZE)
        if self.boft_block_size == 0 and self.boft_block_num == 0:
            raise ConfigError(
                "Either `boft_block_size` or `boft_block_num` must be non-zero. Currently, boft_block_size = 0 and "
                "boft_block_num = 0."
            )
        if self.boft_block_size != 0 and self.boft_block_num != 0:
            raise ConfigError(
                f"You can only specify either boft_block_size ({self.boft_block_size}) or boft_block_num "
                f"({self.boft_block_num}), but not both simultaneously, because boft_block_size x boft_block_num == "
                "in_features."
            )
        check_range("BOFTConfig", "boft_n_butterfly_factor", self.boft_n_butterfly_factor, 1, MAX_BUTTERFLY_FACTORS,
                    " (the number of butterfly factors; 1 is plain block-diagonal OFT)")
        if not 0.0 <= self.boft_dropout <= 1.0:
            raise ConfigError(f"BOFTConfig.boft_dropout must be a probability in [0, 1], got {self.boft_dropout}")
        if self.bias not in BIAS_CHOICES:
            raise ConfigError(f"BOFTConfig.bias must be one of {list(BIAS_CHOICES)}, got {self.bias!r}")
