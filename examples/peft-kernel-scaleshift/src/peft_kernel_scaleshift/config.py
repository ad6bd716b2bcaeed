"""``ScaleShiftConfig``: an attrs class deriving from the core's ``PeftConfig``.

Field names follow HF PEFT's conventions (``target_modules``, ``exclude_modules``,
``modules_to_save``, ``layers_to_transform``, ``layers_pattern``), so the core's standard target
matcher and ``modules_to_save`` handling work on it unchanged. Every field has a JSON-friendly type:
the core's strict converter checks ``adapter_config.json`` against these annotations.
"""

from __future__ import annotations

from typing import Optional, Union

import attrs

from peft_kernel.config import PeftConfig
from peft_kernel.enums import PeftType
from peft_kernel.errors import ConfigError

PEFT_TYPE = "SCALESHIFT"


@attrs.define(kw_only=True)
class ScaleShiftConfig(PeftConfig):
    """Configuration of a ScaleShift adapter.

    ``init_scaleshift_weights=True`` starts the adapter as the identity (scale and shift zero);
    ``False`` draws both from a small normal distribution (useful for tests).
    """

    peft_type: Optional[Union[PeftType, str]] = PEFT_TYPE
    target_modules: Optional[Union[list[str], set[str], str]] = None
    exclude_modules: Optional[Union[list[str], set[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    init_scaleshift_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, set(value))
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("ScaleShiftConfig: `layers_to_transform` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("ScaleShiftConfig: `layers_pattern` needs `layers_to_transform` as well.")
