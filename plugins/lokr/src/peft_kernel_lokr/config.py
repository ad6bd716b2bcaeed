"""``LoKrConfig`` with every field of HF PEFT's (0.21.2), same names and defaults.

No ``from __future__ import annotations`` here: the core's cattrs converter resolves these types.
"""

from typing import Literal, Optional, Union

import attrs

from peft_kernel.plugin_api import ConfigError, PeftType
from peft_kernel_lycoris.config import LycorisConfig


@attrs.define(kw_only=True)
class LoKrConfig(LycorisConfig):
    """Configuration of a LoKr adapter (HF PEFT's ``LoKrConfig``).

    ``delta W = kron(w1, w2) * alpha / r`` where the layer's output and input sizes are each split
    into two factors (``decompose_factor``); ``w2`` is stored whole or as ``lokr_w2_a @ lokr_w2_b``
    (rank ``r``) when ``r`` is smaller than half its larger side, ``w1`` likewise only with
    ``decompose_both``. ``use_effective_conv2d`` stores a decomposed conv ``w2`` as a Tucker product.
    """

    peft_type: Optional[Union[PeftType, str]] = PeftType.LOKR
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: Union[bool, Literal["lycoris"]] = True

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if not (isinstance(self.init_weights, bool) or self.init_weights == "lycoris"):
            raise ConfigError(
                f"LoKrConfig.init_weights must be True (w1 starts at zero), 'lycoris' (w2 starts at zero) or "
                f"False (random), got {self.init_weights!r}"
            )
        if isinstance(self.decompose_factor, bool) or not isinstance(self.decompose_factor, int):
            raise ConfigError(f"LoKrConfig.decompose_factor must be an int (-1 for automatic), got {self.decompose_factor!r}")
