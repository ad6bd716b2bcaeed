"""transformers' ``Trainer`` with adapter-only checkpoints for peft-kernel models.

The stock ``transformers.Trainer`` already *trains* a peft-kernel model with default arguments:
the task classes' ``forward`` has HF's named parameters (``input_ids``, ``labels``...), so the
column filter keeps the batch, ``labels`` is found (``eval_loss``), and ``**kwargs`` lets the
Trainer pass ``num_items_in_batch`` for exact gradient accumulation. What it cannot do is *save*
an adapter: ``Trainer._save`` calls ``save_pretrained`` only on an instance of
``PreTrainedModel`` or of HF PEFT's own ``peft.PeftModel`` (and only while ``peft`` is installed);
any other model is written as its full ``state_dict()`` in ``model.safetensors``, base weights
included. ``Trainer._load_from_checkpoint`` and ``_load_best_model`` likewise read
``adapter_model.safetensors`` only for a model that passes ``isinstance(model, peft.PeftModel)``.
Both tests are class checks in transformers' code, with no hook or attribute to satisfy them, so
no change to the model alone can make the stock Trainer write or resume adapter-only checkpoints.

This module is the smallest addition that does: :class:`PeftKernelTrainerMixin` overrides exactly
those three methods, and only for peft-kernel models (any other model goes to transformers' code
unchanged). For a ``PeftModel`` made without ``task_type`` (whose ``forward(*args, **kwargs)`` names
no input) it also reads the input and label names from the base model's ``forward``, as the stock
Trainer does for HF PEFT's models; with the stock Trainer such a model gets an empty batch. Use it with a one-import change::

    from peft_kernel_finetune.trainer import Trainer   # instead of: from transformers import Trainer

or mix it into another Trainer subclass (TRL's ``SFTTrainer``, your own)::

    class MyTrainer(PeftKernelTrainerMixin, SFTTrainer): ...

Checkpoints (``checkpoint-N/``) and ``trainer.save_model()`` then hold the adapter exactly as
HF PEFT writes it (``adapter_config.json`` + ``adapter_model.safetensors``, non-default adapters in
sub-folders) next to the Trainer's own files (optimizer, scheduler, RNG and trainer state), so a
checkpoint folder opens with ``PeftModel.from_pretrained`` (ours or HF's) and
``peft-kernel inspect``; ``resume_from_checkpoint`` and ``load_best_model_at_end`` load the adapter
tensors back in place, so the optimizer keeps pointing at the same parameters.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers
from torch import nn

__all__ = ["PeftKernelTrainerMixin", "Trainer", "Seq2SeqTrainer", "TrainingStepCallback", "is_peft_kernel_model",
           "load_adapter_checkpoint"]

TRAINING_ARGS_NAME = "training_args.bin"


def is_peft_kernel_model(model: Any) -> bool:
    """Whether ``model`` is a peft-kernel :class:`~peft_kernel.model.PeftModel` (or task class)."""
    from peft_kernel import PeftModel

    return isinstance(model, PeftModel)


def _generic_forward(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes ``*args`` (the task-less ``PeftModel``) rather than named inputs."""
    import inspect

    return any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in inspect.signature(model.forward).parameters.values())


def _adapter_folders(path: str | os.PathLike) -> dict[str, str | None]:
    """``{adapter name: subfolder}`` of the adapters saved under ``path`` (HF PEFT's layout: the
    ``default`` adapter at the root, every other one in a sub-folder named after it)."""
    from peft_kernel.plugin_api import CONFIG_NAME, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME

    def holds_adapter(folder: str) -> bool:
        return os.path.isfile(os.path.join(folder, CONFIG_NAME)) and any(
            os.path.isfile(os.path.join(folder, name)) for name in (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME)
        )

    found: dict[str, str | None] = {}
    if holds_adapter(str(path)):
        found["default"] = None
    if os.path.isdir(path):
        for entry in sorted(os.listdir(path)):
            if holds_adapter(os.path.join(path, entry)):
                found[entry] = entry
    return found


def load_adapter_checkpoint(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load every adapter saved under ``path`` into ``model``; returns their names.

    An adapter the model already has gets its tensors copied in place (its parameters stay the same
    objects, so an optimizer built over them stays valid); one it lacks is added with
    ``load_adapter`` (not trainable). Raises :class:`~peft_kernel.errors.CheckpointError` when the
    folder holds no adapter or a tensor does not fit.
    """
    from peft_kernel import load_peft_weights, set_peft_model_state_dict
    from peft_kernel.plugin_api import CheckpointError

    folders = _adapter_folders(path)
    if not folders:
        raise CheckpointError(f"{path}: no adapter checkpoint here (no adapter_config.json with adapter_model.safetensors)")
    for name, subfolder in folders.items():
        if name in model.peft_config:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            weights = load_peft_weights(str(path), device=str(device), subfolder=subfolder)
            set_peft_model_state_dict(model, weights, adapter_name=name)
        else:
            model.load_adapter(str(path), name, subfolder=subfolder)
    return list(folders)


class TrainingStepCallback(transformers.TrainerCallback):
    """Calls the plugins' ``peft_kernel_training_step`` hook after every optimizer step, before the
    gradients are zeroed (transformers' ``on_optimizer_step``), with the 0-based index of that step.
    Methods that act during training (AdaLoRA's rank reallocation) then train through the
    ``Trainer`` with no user code. :class:`PeftKernelTrainerMixin` adds it; add it yourself to a
    stock ``transformers.Trainer`` (``callbacks=[TrainingStepCallback()]``)."""

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                          **kwargs: Any) -> None:
        if model is not None:
            from peft_kernel.plugin_api import get_registry

            get_registry().training_step(model, state.global_step)


class PeftKernelTrainerMixin:
    """Adapter-only checkpoints for peft-kernel models in a ``transformers.Trainer`` subclass.

    Put it first in the bases (``class T(PeftKernelTrainerMixin, transformers.Trainer)``). Overrides
    ``_save``, ``_load_from_checkpoint`` and ``_load_best_model`` for peft-kernel models only; FSDP
    sharded and DeepSpeed checkpoints are left to transformers. A model sharded with FSDP2 by
    :func:`peft_kernel_finetune.fsdp.shard_peft_model` is saved from its gathered full state dict.
    For peft-kernel models it also adds :class:`TrainingStepCallback` (the training-step hook).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        ours = self._peft_kernel_model()
        if ours is not None:
            self.add_callback(TrainingStepCallback)  # type: ignore[attr-defined]
        if ours is not None and _generic_forward(ours):
            # a PeftModel without task type: its forward(*args, **kwargs) names nothing, so read the base
            # model's (HF's Trainer does the same for HF PEFT models)
            from transformers.utils import can_return_loss, find_labels

            base = type(ours.get_base_model())
            if self.args.label_names is None:  # type: ignore[attr-defined]
                self.label_names = find_labels(base)
            self.can_return_loss = can_return_loss(base)

    def _set_signature_columns_if_needed(self) -> None:
        ours = self._peft_kernel_model()
        if self._signature_columns is None and ours is not None and _generic_forward(ours):  # type: ignore[has-type]
            import inspect

            self._signature_columns = [
                *inspect.signature(ours.get_base_model().forward).parameters,
                *set(["label", "label_ids", *self.label_names]),  # type: ignore[has-type]
            ]
        super()._set_signature_columns_if_needed()  # type: ignore[misc]

    def _peft_kernel_model(self, model: nn.Module | None = None) -> nn.Module | None:
        model = self.model if model is None else model  # type: ignore[attr-defined]
        try:
            unwrapped = self.accelerator.unwrap_model(model, keep_torch_compile=False)  # type: ignore[attr-defined]
        except TypeError:  # accelerate before 1.2 has no keep_torch_compile
            unwrapped = self.accelerator.unwrap_model(model)  # type: ignore[attr-defined]
        return unwrapped if is_peft_kernel_model(unwrapped) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._peft_kernel_model()
        if model is None:
            return super()._save(output_dir, state_dict=state_dict)  # type: ignore[misc]
        args = self.args  # type: ignore[attr-defined]
        output_dir = output_dir if output_dir is not None else args.output_dir
        if state_dict is None:
            from peft_kernel_finetune.fsdp import gather_full_state_dict, is_sharded

            if is_sharded(model):  # FSDP2: every rank joins the gather, the main process writes
                state_dict = gather_full_state_dict(model)
        if not args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        # a full state dict (FSDP FULL_STATE_DICT, DeepSpeed ZeRO-3) is filtered to the adapter's keys
        model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=True)
        processing_class = getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)
        if processing_class is not None:
            processing_class.save_pretrained(output_dir)
        torch.save(args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        ours = self._peft_kernel_model(model)
        if ours is None or getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)  # type: ignore[misc]
        if not _adapter_folders(resume_from_checkpoint):
            # a checkpoint the stock Trainer wrote (the full model.safetensors) still resumes
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)  # type: ignore[misc]
        load_adapter_checkpoint(ours, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        ours = self._peft_kernel_model()
        best = self.state.best_model_checkpoint  # type: ignore[attr-defined]
        if (ours is None or best is None or not _adapter_folders(best)
                or getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False)):
            return super()._load_best_model()  # type: ignore[misc]
        load_adapter_checkpoint(ours, best)


class Trainer(PeftKernelTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` whose checkpoints hold only the adapter of a peft-kernel model."""


class Seq2SeqTrainer(PeftKernelTrainerMixin, transformers.Seq2SeqTrainer):
    """``transformers.Seq2SeqTrainer`` whose checkpoints hold only the adapter of a peft-kernel model."""
