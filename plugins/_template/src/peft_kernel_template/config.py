"""``TemplateConfig``: the targeting fields come from ``TargetedConfig``; declare only your own.

No ``from __future__ import annotations``: the core's converter reads these annotations as types.
"""

from typing import Optional, Union

import attrs

from peft_kernel.plugin_api import ConfigError, PeftType, TargetedConfig


@attrs.define(kw_only=True)
class TemplateConfig(TargetedConfig):
    """A rank-one update ``delta W = scale * outer(template_u, template_v)`` of each targeted Linear."""

    peft_type: Optional[Union[PeftType, str]] = "TEMPLATE"
    scale: float = 1.0
    init_weights: bool = True  # True: template_u starts at zero, so the adapter starts as the identity

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()  # types, regexes and targeting rules are checked there
        if self.scale == 0:
            raise ConfigError("TemplateConfig.scale must not be 0 (the adapter would do nothing)")
