"""MiSS for peft-kernel. The entry module is :mod:`peft_kernel_miss.plugin`."""

from peft_kernel_miss.bone import BoneConfig
from peft_kernel_miss.config import MissConfig

__all__ = ["BoneConfig", "MissConfig"]
