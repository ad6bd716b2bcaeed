"""Bone checkpoints (HF PEFT <= 0.20, ``peft_type: "BONE"``) read as MiSS.

HF PEFT 0.21 dropped Bone for MiSS, its renamed successor: the same block, forward and merge under
new names. As HF's ``convert-bone-to-miss.py`` script does, a Bone adapter becomes a MiSS adapter:
the config's fields carry over (``peft_type`` becomes ``"MISS"``; ``miss_dropout`` and ``mini_r``
keep their defaults) and each ``<module>.bone_block`` tensor becomes ``<module>.miss_block``.
Saving such an adapter writes the MiSS format.

No ``from __future__ import annotations``: the core's converter reads these annotations as types.
"""

from typing import Any, Literal, Optional, Union

import attrs

from peft_kernel.plugin_api import PeftType, TargetedConfig
from peft_kernel_miss.config import MissConfig

BONE_KEY, MISS_KEY = ".bone_block", ".miss_block"


@attrs.define(kw_only=True)
class BoneConfig(TargetedConfig):
    """The fields of HF PEFT's ``BoneConfig`` (<= 0.20), so that ``adapter_config.json`` files it
    wrote are read and type-checked field by field; building one returns the equivalent
    :class:`MissConfig` (``BoneConfig(r=8)`` is ``MissConfig(r=8)``)."""

    peft_type: Optional[Union[PeftType, str]] = "BONE"
    r: int = 64
    init_weights: Union[bool, Literal["bat"]] = True
    bias: str = "none"

    def __new__(cls, **fields: Any) -> MissConfig:  # type: ignore[misc]
        return MissConfig(**{**fields, "peft_type": "MISS"})


def bone_to_miss_keys(state_dict: dict[str, Any]) -> dict[str, Any] | None:
    """``state_dict`` with every ``.bone_block`` key renamed ``.miss_block``; ``None`` if it has none."""
    if not any(key.endswith(BONE_KEY) for key in state_dict):
        return None
    return {(key[: -len(BONE_KEY)] + MISS_KEY if key.endswith(BONE_KEY) else key): value
            for key, value in state_dict.items()}
