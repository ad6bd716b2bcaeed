"""Prompt tuning for peft-kernel. The entry module is :mod:`peft_kernel_prompt_tuning.plugin`."""

from peft_kernel_prompt_tuning.config import PromptTuningConfig, PromptTuningInit

__all__ = ["PromptTuningConfig", "PromptTuningInit"]
