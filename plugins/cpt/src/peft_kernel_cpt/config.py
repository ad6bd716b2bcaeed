"""``CPTConfig``: HF PEFT's fields, names, defaults and rules."""

from __future__ import annotations

from typing import Optional, Union

import attrs

from peft_kernel.plugin_api import MAX_SIZE, ConfigError, PeftType, TaskType
from peft_kernel_prompt_learning import PromptLearningConfig

LOSS_TYPES = ("none", "decay")
"""``opt_weighted_loss_type``: every label token weighs the same, or earlier examples weigh less."""


def _int_list(name: str, value: object, low: int) -> None:
    if (not isinstance(value, list) or len(value) > MAX_SIZE
            or any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in value)):
        raise ConfigError(f"CPTConfig.{name} must be a list of integers >= {low}, got {value!r}.")


def _number(name: str, value: object, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 if positive else value >= 0):
        raise ConfigError(f"CPTConfig.{name} must be a number {'> 0' if positive else '>= 0'}, got {value!r}.")


@attrs.define(kw_only=True)
class CPTConfig(PromptLearningConfig):
    """Configuration of a CPT adapter (HF PEFT's ``CPTConfig``; causal LMs only).

    The virtual tokens are the embeddings of the in-context examples ``cpt_token_ids`` plus a
    trained delta. ``cpt_tokens_type_mask`` gives each token's type: ``4k+1`` / ``4k+3`` the input
    and output templates of example ``k``, ``4k+2`` its input, ``4k+4`` its label, ``0`` none. Only
    template and input tokens are trained, each delta kept within ``opt_projection_format_epsilon``
    (templates) or ``opt_projection_epsilon`` (inputs), scaled by ``sqrt(token_dim / 2048)``. The loss
    covers label tokens, of the context and of the input (``input_type_mask`` in ``forward``, numbered
    from 1 as the context is); with ``opt_weighted_loss_type="decay"`` each earlier example of a row
    weighs ``opt_loss_decay_factor`` times the next. ``cpt_mask`` and ``tokenizer_name_or_path`` are
    kept for HF compatibility. ``num_virtual_tokens`` is ``len(cpt_token_ids)``.
    """

    task_type: Optional[Union[TaskType, str]] = attrs.field(default=None, metadata={"example": "CAUSAL_LM"})
    """Required, and only ``CAUSAL_LM`` (as in HF PEFT); the metadata names a valid value for tests."""
    peft_type: Optional[Union[PeftType, str]] = PeftType.CPT
    cpt_token_ids: Optional[list[int]] = None
    cpt_mask: Optional[list[int]] = None
    cpt_tokens_type_mask: Optional[list[int]] = None
    opt_weighted_loss_type: Optional[str] = "none"
    opt_loss_decay_factor: Optional[float] = 1.0
    opt_projection_epsilon: Optional[float] = 0.1
    opt_projection_format_epsilon: Optional[float] = 0.1
    tokenizer_name_or_path: Optional[str] = None

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.peft_type = PeftType.CPT
        if self.task_type != TaskType.CAUSAL_LM:
            raise ConfigError(f"CPTConfig only supports task_type = CAUSAL_LM (got task_type={self.task_type!r}).")
        if self.cpt_token_ids is None:
            self.cpt_token_ids = [0]
        count = len(self.cpt_token_ids) if isinstance(self.cpt_token_ids, list) else 0
        if self.cpt_mask is None:
            self.cpt_mask = [1] * count
        if self.cpt_tokens_type_mask is None:
            self.cpt_tokens_type_mask = [1] * count
        for name in ("cpt_token_ids", "cpt_mask", "cpt_tokens_type_mask"):
            _int_list(name, getattr(self, name), 0)
        if not (len(self.cpt_token_ids) == len(self.cpt_mask) == len(self.cpt_tokens_type_mask)):
            raise ConfigError("cpt_token_ids, cpt_mask and cpt_tokens_type_mask must have the same length "
                              f"(got {len(self.cpt_token_ids)}, {len(self.cpt_mask)}, {len(self.cpt_tokens_type_mask)}).")
        if not self.cpt_token_ids:
            raise ConfigError("CPTConfig.cpt_token_ids must hold at least one token (the context).")
        self.num_virtual_tokens = len(self.cpt_token_ids)
        if self.opt_weighted_loss_type not in LOSS_TYPES:
            raise ConfigError(f"CPTConfig.opt_weighted_loss_type must be one of {list(LOSS_TYPES)}, "
                              f"got {self.opt_weighted_loss_type!r}.")
        _number("opt_loss_decay_factor", self.opt_loss_decay_factor, positive=True)
        _number("opt_projection_epsilon", self.opt_projection_epsilon, positive=False)
        _number("opt_projection_format_epsilon", self.opt_projection_format_epsilon, positive=False)
