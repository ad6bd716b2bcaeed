"""AdaLoRA for peft-kernel. The entry module is :mod:`peft_kernel_adalora.plugin`."""

from peft_kernel_adalora.config import AdaLoraConfig

__all__ = ["AdaLoraConfig"]
