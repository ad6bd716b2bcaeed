"""SHiRA for peft-kernel. The entry module is :mod:`peft_kernel_shira.plugin`."""

from peft_kernel_shira.config import ShiraConfig

__all__ = ["ShiraConfig"]
