"""VB-LoRA for peft-kernel. The entry module is :mod:`peft_kernel_vblora.plugin`."""

from peft_kernel_vblora.config import VBLoRAConfig

__all__ = ["VBLoRAConfig"]
