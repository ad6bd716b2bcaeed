"""``IA3Config`` with every field of HF PEFT's, same names and defaults.

No ``from __future__ import annotations`` here: the core's cattrs converter reads these
annotations as real types.
"""

from typing import Optional, Union

import attrs

from peft_kernel.plugin_api import ConfigError, PeftType, TargetModulesConfig, compile_pattern


@attrs.define(kw_only=True)
class IA3Config(TargetModulesConfig):
    """Configuration of an (IA)^3 adapter (HF PEFT's ``IA3Config``).

    ``target_modules`` are scaled by a learned vector; those also named in
    ``feedforward_modules`` have the vector applied to their *input* (one entry per input feature),
    the others to their *output* (one entry per output feature). ``target_modules``,
    ``exclude_modules`` and ``modules_to_save`` come from :class:`TargetModulesConfig` (HF PEFT's IA3
    has no ``layers_to_transform``).
    """

    peft_type: Optional[Union[PeftType, str]] = PeftType.IA3
    feedforward_modules: Optional[Union[list[str], set[str], str]] = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if isinstance(self.feedforward_modules, (list, tuple)):
            self.feedforward_modules = set(self.feedforward_modules)
        if isinstance(self.feedforward_modules, str):
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
            return compile_pattern(spec, "IA3Config.feedforward_modules").fullmatch(module_name) is not None
        return any(module_name.endswith(entry) for entry in spec)
