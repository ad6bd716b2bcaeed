"""OFT for peft-kernel. The entry module is :mod:`peft_kernel_oft.plugin`."""

from peft_kernel_oft.config import OFTConfig

__all__ = ["OFTConfig"]
