"""``RoadConfig`` with HF PEFT's fields, names and defaults. The targeting fields come from
the core's ``TargetModulesConfig``, less ``exclude_modules``, which HF's class does not have.

No ``from __future__ import annotations`` here: the core's cattrs converter reads these
annotations as real types.
"""

from typing import Optional, Union

import attrs

from peft_kernel.plugin_api import MAX_SIZE, ConfigError, PeftType, TargetModulesConfig

VARIANTS = {"road_1": 1, "road_2": 2, "road_4": 4}
"""``{variant: angles and scales per pair of output features}`` (``road_1`` shares one between the
two features of a pair, ``road_2`` has one per feature, ``road_4`` two per feature)."""


@attrs.define(kw_only=True)
class RoadConfig(TargetModulesConfig):
    """Configuration of a RoAd adapter (HF PEFT's ``RoadConfig``).

    The outputs of each targeted ``nn.Linear`` are split into groups of ``group_size``; within a
    group, feature ``i`` and feature ``i + group_size / 2`` form a pair that is rotated by a learned
    angle and scaled (``road_theta``, ``road_alpha``), so ``y -> R y`` with ``R`` block-diagonal
    2 x 2 rotation-and-scale blocks. ``variant`` says how many angles and scales a pair has.
    ``out_features`` of every targeted layer must be a multiple of ``group_size``.
    """

    peft_type: Optional[Union[PeftType, str]] = PeftType.ROAD
    exclude_modules: Optional[Union[list[str], set[str], str]] = attrs.field(default=None, init=False)
    """Not in HF PEFT's class: not an argument, not saved, dropped with a warning when a file carries it."""
    variant: str = "road_1"
    group_size: int = 64
    init_weights: bool = True

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.variant not in VARIANTS:
            raise ConfigError(f"RoadConfig.variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        if not 2 <= self.group_size <= MAX_SIZE or self.group_size % 2:
            raise ConfigError(f"RoadConfig.group_size must be a positive even integer (features are paired within "
                              f"a group) of at most {MAX_SIZE:,}, got {self.group_size}")
