"""``ShiraConfig`` with HF PEFT's fields, names and defaults. The targeting fields come from
the core's ``TargetModulesConfig``, less ``exclude_modules``, which HF's class does not have.

No ``from __future__ import annotations`` here: the core's cattrs converter reads these
annotations as real types.
"""

import warnings
from typing import Any, Callable, Optional, Union

import attrs

from peft_kernel.plugin_api import MAX_SIZE, ConfigError, PeftType, TargetModulesConfig, check_range

MASK_TYPES = ("random",)
"""The built-in masks (``mask_type``); any other mask comes from a user ``mask_fn``."""


@attrs.define(kw_only=True)
class ShiraConfig(TargetModulesConfig):
    """Configuration of a SHiRA adapter (HF PEFT's ``ShiraConfig``).

    Each targeted ``nn.Linear`` of shape ``[m, n]`` trains ``r * (m + n)`` of its weight entries (as
    many values as a rank-``r`` LoRA): ``shira_weight`` holds the values, ``shira_indices`` (saved
    with them) their ``(row, column)`` positions. The positions come from ``mask_type`` (``"random"``:
    a permutation drawn from ``random_seed``), or from a ``mask_fn`` set on the config after building
    it, as in HF PEFT: ``config.mask_fn = fn``, called as ``fn(base_layer, r, random_seed=...)`` and
    returning a ``[m, n]`` 0/1 mask with exactly ``r * (m + n)`` ones. ``mask_fn`` is not saved:
    loading reads the saved positions.
    """

    peft_type: Optional[Union[PeftType, str]] = PeftType.SHIRA
    exclude_modules: Optional[Union[list[str], set[str], str]] = attrs.field(default=None, init=False)
    """Not in HF PEFT's class: not an argument, not saved, dropped with a warning when a file carries it."""
    r: int = 32
    mask_type: str = "random"  # HF annotates Literal["random"] but accepts any name, for a mask_fn
    random_seed: Optional[int] = None
    fan_in_fan_out: bool = False
    init_weights: bool = True
    mask_fn: Optional[Callable[..., Any]] = attrs.field(default=None, init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.mask_type not in MASK_TYPES:  # as HF: a warning, since a mask_fn may still be set
            warnings.warn(f"ShiraConfig.mask_type={self.mask_type!r} is not recognized (known: {list(MASK_TYPES)}); "
                          "supply your own masking function with `config.mask_fn = my_mask_fn`.", UserWarning, stacklevel=3)
        check_range("ShiraConfig", "r", self.r, 1, MAX_SIZE)
        if self.random_seed is not None and not -(2**63) <= self.random_seed < 2**64:
            raise ConfigError(f"ShiraConfig.random_seed must fit a torch generator seed (from -2**63 to 2**64 - 1), "
                              f"got {self.random_seed}")
