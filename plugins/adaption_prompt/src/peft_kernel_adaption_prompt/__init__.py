"""Llama-Adapter (adaption prompt) for peft-kernel. The entry module is :mod:`peft_kernel_adaption_prompt.plugin`."""

from peft_kernel_adaption_prompt.config import AdaptionPromptConfig

__all__ = ["AdaptionPromptConfig"]
