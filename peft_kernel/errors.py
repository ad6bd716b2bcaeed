"""Exceptions raised by peft-kernel. Each message names the offending item and what to do."""


class PeftKernelError(Exception):
    """Base class of every error peft-kernel raises on purpose."""


class PluginError(PeftKernelError):
    """A plugin could not be loaded, or two plugins claim the same method, prefix or backend."""


class UnknownMethodError(PeftKernelError, ValueError):
    """A ``peft_type`` that no installed plugin provides."""


class ConfigError(PeftKernelError, ValueError):
    """An adapter config with wrong field types or values."""


class TargetNotFoundError(PeftKernelError, ValueError):
    """``target_modules`` matched no module of the model."""


class CheckpointError(PeftKernelError, ValueError):
    """An adapter checkpoint that cannot be read or does not fit the model."""


class AdapterNameError(PeftKernelError, ValueError):
    """An adapter name that is unknown, already used, or collides with a parameter prefix."""


class MixedBatchError(PeftKernelError, ValueError):
    """Per-row routing that cannot be served: ``adapter_names`` (wrong length, unknown names, training
    mode, merged) or ``task_ids`` (missing where the method needs them, wrong length or range)."""


class UnsupportedFeatureError(PeftKernelError, NotImplementedError):
    """A config field or model that HF PEFT supports and peft-kernel (or the plugin) does not yet."""


class PluginWarning(UserWarning):
    """A plugin misbehaved at run time (its hook raised) and was disabled for the rest of the process."""


# ---- HF PEFT's names ------------------------------------------------------------------------------
PeftError = PeftKernelError
"""HF PEFT's base error class; here every deliberate error derives from it."""

NoMatchingPeftModuleError = TargetNotFoundError
"""HF PEFT's name for "the config's targets matched no module" (a ``ValueError``)."""


class PeftWarning(UserWarning):
    """HF PEFT's base warning class."""
