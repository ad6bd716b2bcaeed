"""Multitask prompt tuning for peft-kernel. The entry module is :mod:`peft_kernel_multitask_prompt_tuning.plugin`."""

from peft_kernel_multitask_prompt_tuning.config import MultitaskPromptTuningConfig, MultitaskPromptTuningInit

__all__ = ["MultitaskPromptTuningConfig", "MultitaskPromptTuningInit"]
