"""WaveFT for peft-kernel. The entry module is :mod:`peft_kernel_waveft.plugin`."""

from peft_kernel_waveft.config import WaveFTConfig

__all__ = ["WaveFTConfig"]
