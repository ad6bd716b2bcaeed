"""``AdapterHost``: what owns the adapters of a ``PeftModel``, and the only way the core reaches them.

``PeftModel(model, config, adapter_name)`` asks the plugins for its host
(``peft_kernel_create_host``, first result): the core's default is the method's tuner, an
:class:`~peft_kernel.tuner.AdapterModel` that injects adapter layers; a family library whose methods
do not wrap layers supplies its own (the prompt-learning family's ``PromptLearner``). Every
``PeftModel`` method that concerns adapters delegates to its host through this protocol, and
:mod:`peft_kernel.adapter_io` saves and loads through it, so the core never asks which kind of
method it holds.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover - annotations only
    import torch
    from torch import nn

    from peft_kernel.adapter_io import LoadResult
    from peft_kernel.config import PeftConfig


@runtime_checkable
class AdapterHost(Protocol):
    """The adapter owner a ``PeftModel`` delegates to. Keys of tensors are HF PEFT's on-disk keys,
    relative to the ``PeftModel`` (``base_model.model.<module>.lora_A.weight``, ``prompt_embeddings``),
    before ``peft_kernel_map_state_dict`` (which :mod:`peft_kernel.adapter_io` applies).

    Optional: a host that sets ``takes_task_ids = True`` receives the task classes' ``task_ids``
    argument (one task per row) in :meth:`serve`'s keywords; the others never see it. The core's
    tuner sets it from its method's ``task_ids`` capability and publishes the ids to the layers.

    Optional: ``serves_compiled(kwargs) -> bool`` and ``serve_compiled(args, kwargs)``, the forward
    Dynamo traces under ``torch.compile`` (see :mod:`peft_kernel.compiled`): no context variables,
    the rows' adapters already published as a tensor."""

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        """``{adapter name: config}`` of every adapter, in the order they were added."""

    @property
    def active_adapter(self) -> str | list[str] | None:
        """HF PEFT's ``active_adapter``: the active name, or the list when several are active."""

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters' names (empty when none is left)."""

    @property
    def plain_model(self) -> nn.Module:
        """The user's model with the adapters in it (``PeftModel.get_base_model()``)."""

    def attach(self, peft_model: nn.Module) -> None:
        """Called once by the new ``PeftModel``: set ``peft_model.base_model`` (the host itself for a
        tuner; the transformers model for prompt learning, as in HF PEFT) and any other attribute
        HF PEFT users see on the ``PeftModel`` (``prompt_encoder``...)."""

    def add_adapter(self, adapter_name: str, config: PeftConfig) -> None:
        """Add a freshly initialised, inactive adapter (the first one of the host is active)."""

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate an adapter (or several, where the method allows); trainable unless ``inference_mode``."""

    def settle_loaded(self, adapter_name: str) -> None:
        """After weights were loaded into ``adapter_name``: re-apply what depends on its config
        (a tuner freezes an active adapter loaded for inference)."""

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turn the named adapters' gradients on or off, or raise ``TypeError`` where that is not supported."""

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether the adapters could be converted to LoRA."""

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` and everything it added."""

    def disable_adapter(self) -> contextlib.AbstractContextManager[None]:
        """A context in which the model computes as the base model."""

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weights, or raise ``NotImplementedError`` naming why not."""

    def unmerge_adapter(self) -> None:
        """Undo :meth:`merge_adapter` (or refuse as it does)."""

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Merge, remove the adapters and return the plain model (or refuse as :meth:`merge_adapter`)."""

    def unload(self) -> nn.Module:
        """Remove the adapters without merging and return the plain model (or refuse)."""

    def serve(self, args: tuple, kwargs: dict, adapter_names: Sequence[str] | None) -> Any:
        """The forward pass; ``adapter_names`` (one per row, already checked) for a mixed batch."""

    def serve_generate(self, args: tuple, kwargs: dict, adapter_names: Sequence[str] | None) -> Any:
        """``generate``, as :meth:`serve`."""

    def release(self) -> None:
        """Give the user's model back as it came (a failed ``from_pretrained``): modules and
        ``requires_grad`` flags."""

    def saved_tensors(self, adapter_name: str, state_dict: dict[str, torch.Tensor] | None = None,
                      save_embedding_layers: str | bool = "auto") -> dict[str, torch.Tensor]:
        """The tensors saved for ``adapter_name``, detached, under their on-disk keys. ``state_dict``
        (a full ``PeftModel`` state dict) and ``save_embedding_layers`` are ``save_pretrained``'s."""

    def load_tensors(self, tensors: dict[str, torch.Tensor], adapter_name: str,
                     ignore_mismatched_sizes: bool = False) -> LoadResult:
        """Copy on-disk-keyed ``tensors`` into ``adapter_name``; raise
        :class:`~peft_kernel.errors.CheckpointError` naming keys that fit nothing, before copying."""
