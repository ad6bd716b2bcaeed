"""``FourierFTConfig`` with every field of HF PEFT's, same names and defaults.

No ``from __future__ import annotations`` here: the core's cattrs converter reads these
annotations as real types.
"""

from typing import Literal, Optional, Union

import attrs

from peft_kernel.plugin_api import MAX_WIDTH, ConfigError, PeftType, TargetedConfig, check_range

MAX_FREQUENCIES = MAX_WIDTH * MAX_WIDTH
"""Upper bound of ``n_frequency`` here; each layer also bounds it by its ``out * in`` positions."""


@attrs.define(kw_only=True)
class FourierFTConfig(TargetedConfig):
    """Configuration of a FourierFT adapter (HF PEFT's ``FourierFTConfig``).

    Each targeted weight ``W [out, in]`` learns ``n_frequency`` spectral coefficients at positions
    drawn from ``random_loc_seed``; ``delta W = scaling * Re(ifft2(spectrum))``. The positions are
    not saved: they are redrawn from the seed, so the seed is part of the adapter.
    """

    peft_type: Optional[Union[PeftType, str]] = PeftType.FOURIERFT
    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: Optional[int] = 777
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "fourier_only"] = "none"
    n_frequency_pattern: Optional[dict[str, int]] = attrs.field(factory=dict)
    init_weights: bool = False

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        check_range("FourierFTConfig", "n_frequency", self.n_frequency, 1, MAX_FREQUENCIES)
        for key, value in (self.n_frequency_pattern or {}).items():
            check_range("FourierFTConfig", f"n_frequency_pattern[{key!r}]", value, 1, MAX_FREQUENCIES)
        if self.random_loc_seed is not None and not -(2**63) <= self.random_loc_seed < 2**64:
            raise ConfigError(f"FourierFTConfig.random_loc_seed must fit a torch generator seed "
                              f"(from -2**63 to 2**64 - 1), got {self.random_loc_seed}")
