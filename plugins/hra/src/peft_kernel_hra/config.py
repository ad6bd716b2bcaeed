"""``HRAConfig`` with every field of HF PEFT's (0.21.2), same names and defaults.

No ``from __future__ import annotations`` here: the core's cattrs converter reads these
annotations as real types.
"""

from typing import Literal, Optional, Union

import attrs

from peft_kernel.plugin_api import MAX_SIZE, PeftType, TargetedConfig, check_range


@attrs.define(kw_only=True)
class HRAConfig(TargetedConfig):
    """Configuration of an HRA adapter (HF PEFT's ``HRAConfig``).

    Each targeted layer's weight is multiplied by a chain of ``r`` learned Householder reflections
    ``I - 2 u u^T / |u|^2`` acting on its input features (``in_channels * kh * kw`` for a Conv2d),
    or with ``apply_GS`` by the reflections in the Gram-Schmidt orthonormalised vectors.
    ``init_weights`` starts the adapter as the identity by repeating each of ``r / 2`` random
    vectors twice (the reflections cancel in pairs); it needs an even ``r`` (odd: a warning, and
    random vectors as with ``init_weights=False``). The targeting fields come from
    :class:`TargetedConfig`.
    """

    peft_type: Optional[Union[PeftType, str]] = PeftType.HRA
    r: int = 8
    apply_GS: bool = False
    init_weights: bool = True
    bias: Literal["none", "all", "hra_only"] = "none"  # the core's converter refuses other values, naming them

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        check_range("HRAConfig", "r", self.r, 1, MAX_SIZE,
                    " (the number of Householder reflections per layer; HF PEFT's default is 8)")
