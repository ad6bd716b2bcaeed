"""``LycorisConfig``: the fields LoHa and LoKr share, with HF PEFT's names and defaults.

No ``from __future__ import annotations`` here: the core's cattrs converter resolves these types.
"""

from typing import Optional, Union

import attrs

from peft_kernel.plugin_api import MAX_SIZE, ConfigError, TargetedConfig, check_range


@attrs.define(kw_only=True)
class LycorisConfig(TargetedConfig):
    """Fields common to HF PEFT's ``LoHaConfig`` and ``LoKrConfig`` (HF's ``LycorisConfig`` plus the
    per-method fields both declare); the targeting fields come from :class:`TargetedConfig`."""

    rank_pattern: Optional[dict[str, int]] = attrs.field(factory=dict)
    alpha_pattern: Optional[dict[str, Union[int, float]]] = attrs.field(factory=dict)
    r: int = 8
    alpha: Union[int, float] = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    init_weights: bool = True

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        name = type(self).__name__
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
