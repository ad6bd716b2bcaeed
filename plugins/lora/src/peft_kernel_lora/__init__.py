"""LoRA for peft-kernel. The entry module is :mod:`peft_kernel_lora.plugin`."""

from peft_kernel_lora.config import LoraConfig

__all__ = ["LoraConfig"]
