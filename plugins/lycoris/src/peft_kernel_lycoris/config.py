"""``LycorisConfig``: the fields LoHa and LoKr share, with HF PEFT's names and defaults.

No ``from __future__ import annotations`` here: the core's cattrs converter resolves these types.
"""

from typing import Optional, Union

import attrs

from peft_kernel.config import MAX_SIZE, PeftConfig, check_range
from peft_kernel.errors import ConfigError


@attrs.define(kw_only=True)
class LycorisConfig(PeftConfig):
    """Fields common to HF PEFT's ``LoHaConfig`` and ``LoKrConfig`` (HF's ``LycorisConfig`` plus the
    per-method fields both declare)."""

    rank_pattern: Optional[dict[str, int]] = attrs.field(factory=dict)
    alpha_pattern: Optional[dict[str, Union[int, float]]] = attrs.field(factory=dict)
    r: int = 8
    alpha: Union[int, float] = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: Optional[Union[list[str], set[str], str]] = None
    exclude_modules: Optional[Union[list[str], set[str], str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        name = type(self).__name__
        for field in ("target_modules", "exclude_modules"):
            value = getattr(self, field)
            if isinstance(value, list):
                setattr(self, field, set(value))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"{name}.r should be a positive integer value but the value passed is {self.r!r}")
        for field in ("rank_dropout", "module_dropout"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name}.{field} is a probability and must be in [0, 1], got {value!r}")
        for field, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if pattern is not None and not isinstance(pattern, dict):
                raise ConfigError(f"{name}.{field} must be a dict mapping module-name patterns to values, got {pattern!r}")
        for key, value in (self.rank_pattern or {}).items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(
                    f"{name}.rank_pattern[{key!r}]: `r` should be a positive integer value but the value passed is {value!r}"
                )
            check_range(name, f"rank_pattern[{key!r}]", value, 1, MAX_SIZE, " (a rank)")
        check_range(name, "r", self.r, 1, MAX_SIZE)
        if isinstance(self.target_modules, str):
            if self.layers_to_transform is not None:
                raise ConfigError(
                    f"{name}: `layers_to_transform` cannot be used when `target_modules` is a str "
                    "(a regex already selects the layers)."
                )
            if self.layers_pattern is not None:
                raise ConfigError(f"{name}: `layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
