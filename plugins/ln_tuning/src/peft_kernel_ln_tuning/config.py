"""``LNTuningConfig``: HF PEFT's fields (targeting only) and defaults.

No ``from __future__ import annotations``: the core's converter reads these annotations as types.
"""

from typing import Optional, Union

import attrs

from peft_kernel.plugin_api import PeftType, TargetModulesConfig


@attrs.define(kw_only=True)
class LNTuningConfig(TargetModulesConfig):
    """LayerNorm tuning (https://huggingface.co/papers/2312.11420): each targeted module (by default
    the model's norm layers) gets a trainable copy per adapter, used in its place; the base stays
    frozen. Any module type can be targeted (an MLP, an attention block), as in HF PEFT."""

    peft_type: Optional[Union[PeftType, str]] = "LN_TUNING"
