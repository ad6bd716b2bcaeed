"""``WaveFTConfig`` with every field of HF PEFT's, same names and defaults.

No ``from __future__ import annotations`` here: the core's cattrs converter reads these
annotations as real types.
"""

from typing import Literal, Optional, Union

import attrs

from peft_kernel.plugin_api import MAX_WIDTH, ConfigError, PeftType, TargetedConfig, check_range

MAX_COEFFICIENTS = MAX_WIDTH * MAX_WIDTH
"""Upper bound of ``n_frequency`` here; each layer also bounds it by its ``out * in`` positions."""

WAVELET_FAMILIES = (
    *(f"db{n}" for n in range(1, 39)),
    *(f"sym{n}" for n in range(2, 21)),
    *(f"coif{n}" for n in range(1, 18)),
)
"""The wavelet families HF PEFT's config accepts: Daubechies 1-38, symlets 2-20, coiflets 1-17."""


@attrs.define(kw_only=True)
class WaveFTConfig(TargetedConfig):
    """Configuration of a WaveFT adapter (HF PEFT's ``WaveFTConfig``).

    Each targeted weight ``W [out, in]`` learns ``n_frequency`` wavelet coefficients at positions
    drawn from ``random_loc_seed``; ``delta W = scaling * IDWT2(coefficients)`` with the
    ``wavelet_family``'s synthesis filters (``use_idwt=False``: the sparse coefficient matrix
    itself, scaled). The positions are not saved: they are redrawn from the seed on load.
    ``proportional_parameters`` gives each layer ``n_frequency * layers * its share of all targeted
    weights' elements`` coefficients instead (``n_frequency_pattern`` is then ignored, as in HF).
    """

    peft_type: Optional[Union[PeftType, str]] = PeftType.WAVEFT
    n_frequency: int = 2592
    scaling: float = 25.0
    wavelet_family: str = "db1"
    use_idwt: bool = True
    random_loc_seed: int = 777
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "waveft_only"] = "none"
    n_frequency_pattern: Optional[dict[str, int]] = attrs.field(factory=dict)
    proportional_parameters: bool = False
    init_weights: bool = True

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        check_range("WaveFTConfig", "n_frequency", self.n_frequency, 1, MAX_COEFFICIENTS)
        for key, value in (self.n_frequency_pattern or {}).items():
            check_range("WaveFTConfig", f"n_frequency_pattern[{key!r}]", value, 1, MAX_COEFFICIENTS)
        if self.wavelet_family not in WAVELET_FAMILIES:
            raise ConfigError(
                f"WaveFTConfig.wavelet_family: wavelet family {self.wavelet_family!r} is not supported; the "
                f"supported families are db1-db38, sym2-sym20 and coif1-coif17: {list(WAVELET_FAMILIES)}"
            )
        if not -(2**63) <= self.random_loc_seed < 2**64:
            raise ConfigError(f"WaveFTConfig.random_loc_seed must fit a torch generator seed "
                              f"(from -2**63 to 2**64 - 1), got {self.random_loc_seed}")
