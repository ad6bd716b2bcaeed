"""ScaleShift for peft-kernel. The entry module is :mod:`peft_kernel_scaleshift.plugin`.

Only the config is imported here: the core imports the entry module (and so this package) at
startup, so torch-heavy layer code stays in :mod:`peft_kernel_scaleshift.layers`, imported on use.
"""

from peft_kernel_scaleshift.config import ScaleShiftConfig

__all__ = ["ScaleShiftConfig"]
