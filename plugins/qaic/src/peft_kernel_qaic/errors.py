"""Errors of the Cloud AI 100 backend. Each message names the offending item and what to do."""

from __future__ import annotations

from peft_kernel import PeftKernelError


class QaicError(PeftKernelError):
    """Base class of the errors the qaic backend raises on purpose."""


class AdapterLoadError(QaicError, ValueError):
    """An adapter that cannot be served: not LoRA, wrong shapes for the base model, unsupported feature."""


class AdapterMappingError(QaicError, ValueError):
    """``prompt_to_adapter_mapping`` with an unknown adapter or the wrong length."""


class AdapterSlotError(QaicError, ValueError):
    """More adapters than the exported graph has slots for."""


class PromptTooLongError(QaicError, ValueError):
    """A prompt (plus the tokens to generate) that does not fit the exported context length."""


class ExportConfigError(QaicError, ValueError):
    """An unsupported model architecture or export option."""


class SDKNotFoundError(QaicError, RuntimeError):
    """The Cloud AI 100 SDK (``qaic-exec`` / runtime) is not installed."""
