"""FourierFT for peft-kernel. The entry module is :mod:`peft_kernel_fourierft.plugin`."""

from peft_kernel_fourierft.config import FourierFTConfig

__all__ = ["FourierFTConfig"]
