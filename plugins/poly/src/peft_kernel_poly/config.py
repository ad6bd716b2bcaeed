"""``PolyConfig``: HF PEFT's field names, defaults and checks.

No ``from __future__ import annotations``: the core's converter reads these annotations as types.
"""

from typing import Literal, Optional, Union

import attrs

from peft_kernel.plugin_api import MAX_SIZE, ConfigError, PeftType, TargetModulesConfig, check_range


@attrs.define(kw_only=True)
class PolyConfig(TargetModulesConfig):
    """Polytropon (https://huggingface.co/papers/2202.13914): each targeted ``nn.Linear`` holds a
    bank of ``n_skills`` LoRA skills of rank ``r``, each cut into ``n_splits`` blocks along the
    features; a router learns, per task, logits over the skills of each block. A row with task ``t``
    gets the LoRA whose blocks are its task's normalised mixtures of the skills' blocks, so every
    forward and generate needs ``task_ids`` (one task per row, from ``0`` to ``n_tasks - 1``)."""

    peft_type: Optional[Union[PeftType, str]] = "POLY"
    r: int = 8
    init_weights: bool = True  # True: the skills' B blocks start at zero, so the adapter starts as the identity
    poly_type: Literal["poly"] = "poly"
    n_tasks: int = 1
    n_skills: int = 4
    n_splits: int = 1

    def __attrs_post_init__(self) -> None:
        if self.poly_type != "poly":
            raise ConfigError(
                f"PolyConfig: $.poly_type must be 'poly' (the only router HF PEFT has), got {self.poly_type!r}"
            )
        super().__attrs_post_init__()
        check_range("PolyConfig", "r", self.r, 1, MAX_SIZE)
        check_range("PolyConfig", "n_tasks", self.n_tasks, 1, MAX_SIZE)
        check_range("PolyConfig", "n_skills", self.n_skills, 1, MAX_SIZE)
        check_range("PolyConfig", "n_splits", self.n_splits, 1, MAX_SIZE)
