"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for peft-kernel models, on CPU (gloo) or GPUs.

Three helpers, built on torch.distributed only:

* :func:`shard_peft_model` shards a PEFT model in place: every decoder layer / transformer block
  (the base model's ``_no_split_modules`` classes, else the members of its layer lists), then the
  root. Adapter weights are sharded with the layer that holds them.
* :func:`gather_full_state_dict` gathers the full (unsharded) state dict; a collective: every rank
  must call it.
* :func:`mark_prepared` lets the transformers ``Trainer`` train an already-sharded model: accelerate
  skips a model it has prepared already, so the Trainer neither wraps it in
  ``DistributedDataParallel`` nor moves it; FSDP2's own reduce-scatter averages the gradients.

The integration Trainer (``peft_kernel_finetune.trainer``) saves a sharded model by
gathering the full state dict on all ranks and calling ``save_pretrained(state_dict=...)`` on the
main process, so the adapter it writes equals the one an unsharded model with the same weights writes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["shard_peft_model", "gather_full_state_dict", "is_sharded", "mark_prepared", "block_classes"]


def _fsdp() -> Any:
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError as exc:  # torch < 2.6 keeps FSDP2 under _composable
        try:
            from torch.distributed._composable.fsdp import FSDPModule, fully_shard  # type: ignore[no-redef]
        except ImportError:
            raise ImportError("FSDP2 (torch.distributed.fsdp.fully_shard) needs a newer torch") from exc
    return FSDPModule, fully_shard


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (or a module in it) is sharded with FSDP2."""
    try:
        FSDPModule, _ = _fsdp()
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def block_classes(model: nn.Module) -> set[str]:
    """Class names of the model's transformer blocks: the ``_no_split_modules`` of any transformers
    model inside (``LlamaDecoderLayer``...)."""
    names: set[str] = set()
    for module in model.modules():
        for name in getattr(module, "_no_split_modules", None) or ():
            names.add(name)
    return names


def _blocks(model: nn.Module) -> list[nn.Module]:
    names = block_classes(model)
    blocks = [m for m in model.modules() if type(m).__name__ in names] if names else []
    if not blocks:  # no _no_split_modules: the members of the model's layer lists
        blocks = [child for m in model.modules() if isinstance(m, nn.ModuleList) for child in m
                  if any(True for _ in child.parameters())]
    # only the outermost of nested blocks
    inner = {id(sub) for b in blocks for sub in b.modules() if sub is not b}
    return [b for b in blocks if id(b) not in inner]


def shard_peft_model(model: nn.Module, *, mesh: Any = None, reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` in place with FSDP2: each transformer block, then the root; returns it.

    Needs an initialised default process group (``torchrun`` + ``torch.distributed.init_process_group``,
    or the Trainer's ``TrainingArguments``); the model must already be on the device it trains on
    (the CPU with gloo). Add or load adapters *before* sharding. ``mesh`` defaults to one dimension
    over all ranks.
    """
    _, fully_shard = _fsdp()
    kwargs: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if mesh is not None:
        kwargs["mesh"] = mesh
    for block in _blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def gather_full_state_dict(model: nn.Module, *, cpu_offload: bool = True) -> dict[str, torch.Tensor]:
    """The full state dict of a sharded model (plain tensors, the unsharded names).

    A collective: call it on every rank. With ``cpu_offload`` (the default) the tensors are gathered
    to the CPU of rank 0 and the other ranks get an empty dict; without it every rank gets them all.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload))


def mark_prepared(model: nn.Module) -> nn.Module:
    """Mark a sharded model as prepared for accelerate, so that ``accelerator.prepare`` (which the
    Trainer calls) returns it unchanged instead of wrapping it in ``DistributedDataParallel``."""
    model._is_accelerate_prepared = True  # type: ignore[attr-defined]
    return model
