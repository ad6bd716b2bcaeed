"""Entry module of peft-kernel-prompt-learning: adds the family's hook and hosts its methods'
adapters. Registers no method. Cheap to import (no torch)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peft_kernel.plugin_api import hookimpl

if TYPE_CHECKING:  # pragma: no cover - annotations only
    import pluggy

    from peft_kernel.plugin_api import MethodRecord


@hookimpl
def peft_kernel_add_hookspecs(pm: pluggy.PluginManager) -> None:
    from peft_kernel_prompt_learning.hookspecs import PromptLearningSpecs

    pm.add_hookspecs(PromptLearningSpecs)


@hookimpl
def peft_kernel_create_host(record: MethodRecord, model: Any, config: Any, adapter_name: str) -> Any:
    """A :class:`~peft_kernel_prompt_learning.learner.PromptLearner` holding ``adapter_name``, for
    records with the ``prompt_learning`` capability."""
    if not record.supports("prompt_learning"):
        return None
    from peft_kernel_prompt_learning.learner import PromptLearner

    learner = PromptLearner(record, model)
    learner.add_adapter(adapter_name, config)
    return learner
