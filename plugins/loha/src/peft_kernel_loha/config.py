"""``LoHaConfig`` with every field of HF PEFT's (0.21.2), same names and defaults.

No ``from __future__ import annotations`` here: the core's cattrs converter resolves these types.
"""

from typing import Optional, Union

import attrs

from peft_kernel.plugin_api import ConfigError, PeftType
from peft_kernel_lycoris.config import LycorisConfig


@attrs.define(kw_only=True)
class LoHaConfig(LycorisConfig):
    """Configuration of a LoHa adapter (HF PEFT's ``LoHaConfig``).

    ``delta W = (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b) * alpha / r``; with
    ``use_effective_conv2d`` a conv kernel's two factors are Tucker products with cores
    ``hada_t1`` / ``hada_t2``.
    """

    peft_type: Optional[Union[PeftType, str]] = PeftType.LOHA
    init_weights: bool = True

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if not isinstance(self.init_weights, bool):
            raise ConfigError(
                f"LoHaConfig.init_weights must be True (zero-initialised delta) or False (random), "
                f"got {self.init_weights!r}"
            )
