"""OSF for peft-kernel. The entry module is :mod:`peft_kernel_osf.plugin`."""

from peft_kernel_osf.config import OSFConfig

__all__ = ["OSFConfig"]
