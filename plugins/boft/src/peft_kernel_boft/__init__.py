"""BOFT for peft-kernel. The entry module is :mod:`peft_kernel_boft.plugin`."""

from peft_kernel_boft.config import BOFTConfig

__all__ = ["BOFTConfig"]
