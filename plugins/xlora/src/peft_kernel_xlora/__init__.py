"""X-LoRA for peft-kernel. The entry module is :mod:`peft_kernel_xlora.plugin`."""

from peft_kernel_xlora.config import XLoraConfig

__all__ = ["XLoraConfig"]
