"""``IA3Config`` with every field of HF PEFT's, same names and defaults.

No ``from __future__ import annotations`` here: the core's cattrs converter reads these
annotations as real types.
"""

from typing import Optional, Union

import attrs

from peft_kernel.config import PeftConfig
from peft_kernel.enums import PeftType
from peft_kernel.errors import ConfigError


@attrs.define(kw_only=True)
class IA3Config(PeftConfig):
    """Configuration of an (IA)^3 adapter (HF PEFT's ``IA3Config``).

    ``target_modules`` are scaled by a learned vector; those also named in
    ``feedforward_modules`` have the vector applied to their *input* (one entry per input feature),
    the others to their *output* (one entry per output feature).
    """

    peft_type: Optional[Union[PeftType, str]] = PeftType.IA3
    target_modules: Optional[Union[list[str], set[str], str]] = None
    exclude_modules: Optional[Union[list[str], set[str], str]] = None
    feedforward_modules: Optional[Union[list[str], set[str], str]] = None
    fan_in_fan_out: bool = False
    modules_to_save: Optional[list[str]] = None
    init_ia3_weights: bool = True

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, set(value))
        if isinstance(self.feedforward_modules, str):
            from peft_kernel.targeting import compile_pattern

            compile_pattern(self.feedforward_modules, "IA3Config.feedforward_modules")
        if isinstance(self.target_modules, set) and isinstance(self.feedforward_modules, set):
            extra = self.feedforward_modules - self.target_modules
            if extra:
                raise ConfigError(
                    "`feedforward_modules` should be a subset of `target_modules`; "
                    f"{sorted(extra)} are not in target_modules={sorted(self.target_modules)}"
                )

    def is_feedforward(self, module_name: str) -> bool:
        """HF PEFT's rule: a regex string must match the whole dotted name; a list entry matches
        when the dotted name ends with it."""
        spec = self.feedforward_modules
        if spec is None:
            return False
        if isinstance(spec, str):
            from peft_kernel.targeting import compile_pattern

            return compile_pattern(spec, "IA3Config.feedforward_modules").fullmatch(module_name) is not None
        return any(module_name.endswith(entry) for entry in spec)
