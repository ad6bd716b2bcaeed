"""``C3AConfig`` with every field of HF PEFT's (0.21.2), same names, order and defaults.

No ``from __future__ import annotations`` here: the core's cattrs converter reads these
annotations as real types.
"""

from typing import Literal, Optional, Union

import attrs

from peft_kernel.plugin_api import MAX_SIZE, ConfigError, PeftType, TargetedConfig, check_range

BIAS_CHOICES = ("none", "all", "c3a_only")


@attrs.define(kw_only=True)
class C3AConfig(TargetedConfig):
    """Configuration of a C3A adapter (HF PEFT's ``C3AConfig``).

    Each targeted ``nn.Linear`` gets an update made of ``out/block_size x in/block_size``
    circulant blocks, each defined by a learned kernel of ``block_size`` values (a circular
    convolution of the input block), applied with FFTs. ``block_size`` must divide the layer's
    input and output sizes; ``block_size_pattern`` overrides it per module (regex keys, as
    ``rank_pattern``). ``init_weights``: ``True`` zeros the kernels (the adapter starts as a no-op);
    ``False`` and ``"xavier_uniform"`` (the default) use Xavier-uniform, ``"kaiming_uniform"`` and
    ``"gaussian"`` those distributions. The targeting fields come from :class:`TargetedConfig`.
    """

    peft_type: Optional[Union[PeftType, str]] = PeftType.C3A
    exclude_modules: Optional[Union[list[str], set[str], str]] = attrs.field(default=None, init=False)
    """HF PEFT's ``C3AConfig`` has no ``exclude_modules``: not an argument, not in ``to_dict`` (so
    HF's ``C3AConfig(**our_dict)`` works), and dropped with a warning when a file carries it."""
    block_size: int = 256
    bias: str = "none"
    block_size_pattern: Optional[dict[str, int]] = attrs.field(factory=dict)
    init_weights: Optional[Union[bool, Literal["gaussian", "kaiming_uniform", "xavier_uniform"]]] = "xavier_uniform"

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        check_range("C3AConfig", "block_size", self.block_size, 1, MAX_SIZE)
        for pattern, size in (self.block_size_pattern or {}).items():
            check_range("C3AConfig", f"block_size_pattern[{pattern!r}]", size, 1, MAX_SIZE)
        if self.bias not in BIAS_CHOICES:
            raise ConfigError(f"C3AConfig.bias must be one of {list(BIAS_CHOICES)}, got {self.bias!r}")
