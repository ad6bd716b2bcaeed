"""LoKr for peft-kernel. The entry module is :mod:`peft_kernel_lokr.plugin`."""

from peft_kernel_lokr.config import LoKrConfig

__all__ = ["LoKrConfig"]
