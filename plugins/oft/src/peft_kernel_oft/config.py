"""``OFTConfig`` with every field of HF PEFT's (0.21.2), same names and defaults.

No ``from __future__ import annotations`` here: the core's cattrs converter reads these
annotations as real types.
"""

from typing import Literal, Optional, Union

import attrs

from peft_kernel.plugin_api import MAX_SIZE, ConfigError, PeftType, TargetedConfig, check_range

BIAS_CHOICES = ("none", "all", "oft_only")
MAX_NEUMANN_TERMS = 100
"""More terms add nothing to the Cayley-Neumann approximation but time to every forward."""


@attrs.define(kw_only=True)
class OFTConfig(TargetedConfig):
    """Configuration of an OFT adapter (HF PEFT's ``OFTConfig``).

    Each targeted layer's input features are split into ``r`` blocks of ``oft_block_size``
    (give exactly one of the two; the other follows from the layer's size, and a value that does
    not divide it is moved to the nearest divisor with a warning, as HF PEFT does). Each block is
    rotated by the Cayley transform of a learned skew-symmetric matrix. The targeting fields come
    from :class:`TargetedConfig`.
    """

    peft_type: Optional[Union[PeftType, str]] = PeftType.OFT
    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "oft_only"] = "none"
    init_weights: bool = True
    coft: bool = False
    eps: float = 6e-05
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.r < 0 or self.oft_block_size < 0:
            raise ConfigError(
                f"OFTConfig.r and oft_block_size must be >= 0, got r={self.r}, oft_block_size={self.oft_block_size}"
            )
        if self.r == 0 and self.oft_block_size == 0:
            raise ConfigError(
                f"Either `r` or `oft_block_size` must be non-zero. Currently, r = {self.r} and "
                f"oft_block_size = {self.oft_block_size}."
            )
        if self.r != 0 and self.oft_block_size != 0:
            raise ConfigError(
                f"You can only specify either r ({self.r}) or oft_block_size ({self.oft_block_size}), but not both "
                "simultaneously, because r x oft_block_size == in_features."
            )
        if not 0.0 <= self.module_dropout < 1.0:
            raise ConfigError(f"OFTConfig.module_dropout must be in [0, 1), got {self.module_dropout}")
        if self.bias not in BIAS_CHOICES:
            raise ConfigError(f"OFTConfig.bias must be one of {list(BIAS_CHOICES)}, got {self.bias!r}")
        if self.num_cayley_neumann_terms < 0:
            raise ConfigError(f"OFTConfig.num_cayley_neumann_terms must be >= 0, got {self.num_cayley_neumann_terms}")
        check_range("OFTConfig", "num_cayley_neumann_terms", self.num_cayley_neumann_terms, 0, MAX_NEUMANN_TERMS,
                    " (each term is a matrix product in every forward; HF PEFT's default is 5)")
        check_range("OFTConfig", "r", self.r, 0, MAX_SIZE)
        check_range("OFTConfig", "oft_block_size", self.oft_block_size, 0, MAX_SIZE)
        if self.eps < 0:
            raise ConfigError(f"OFTConfig.eps must be >= 0, got {self.eps}")
