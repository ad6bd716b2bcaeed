"""RoAd for peft-kernel. The entry module is :mod:`peft_kernel_road.plugin`."""

from peft_kernel_road.config import RoadConfig

__all__ = ["RoadConfig"]
