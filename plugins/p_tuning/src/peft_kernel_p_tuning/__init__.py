"""P-tuning for peft-kernel. The entry module is :mod:`peft_kernel_p_tuning.plugin`."""

from peft_kernel_p_tuning.config import PromptEncoderConfig, PromptEncoderReparameterizationType

__all__ = ["PromptEncoderConfig", "PromptEncoderReparameterizationType"]
