"""What ``AdaLoraModel`` (the generated tuner, ``peft_model.base_model``) adds to the core's
``AdapterModel`` (the record's ``tuner_mixin``): one trainable adapter, its rank allocator,
``update_and_allocate(global_step)`` and the orthogonal regularisation of ``A`` and ``B`` added to
the loss of a forward that returns one. Imported on first use only (it imports torch)."""

from __future__ import annotations

from typing import Any

import torch

from peft_kernel_adalora.allocator import RankAllocator
from peft_kernel_adalora.layers import SVDLayer


class AdaLoraTuner:
    """Mixed into the core's ``AdapterModel`` (which provides ``model``, ``peft_config``, ``_inject``)."""

    trainable_adapter_name: str | None = None
    rankallocator: RankAllocator | None = None

    @property
    def prefix(self) -> str:
        """HF PEFT's ``AdaLoraModel.prefix`` (the record's prefix is ``lora_E``, which LoRA's lacks)."""
        return "lora_"

    def _inject(self, adapter_name: str, peft_config: Any, state_dict: dict[str, Any] | None = None) -> None:
        """HF PEFT's rule: at most one adapter that is not in ``inference_mode``; it gets the allocator."""
        trains = not peft_config.inference_mode
        if trains and any(not c.inference_mode for c in self.peft_config.values()):
            raise ValueError("AdaLoraModel supports only 1 trainable adapter. When using multiple adapters, set "
                             "inference_mode to True for all adapters except the one you want to train.")
        super()._inject(adapter_name, peft_config, state_dict)  # type: ignore[misc]
        if trains:
            self.trainable_adapter_name = adapter_name
            self.rankallocator = RankAllocator(self.svd_layers(), peft_config, adapter_name)

    def svd_layers(self) -> dict[str, SVDLayer]:
        """``{module path in the user's model: layer}`` of every AdaLoRA layer."""
        return {path: module for path, module in self.model.named_modules() if isinstance(module, SVDLayer)}

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)  # type: ignore[misc]
        if adapter_name == self.trainable_adapter_name:
            self.trainable_adapter_name, self.rankallocator = None, None

    # ---- training -----------------------------------------------------------------------------
    def update_and_allocate(self, global_step: int) -> None:
        """Call after ``optimizer.step()`` and before ``optimizer.zero_grad()`` with the 0-based
        step: updates the importance scores (before step ``total_step - tfinal``), masks ``E`` to the
        step's budget (every ``deltaT`` steps of the reduction phase, finally at ``total_step -
        tfinal``, and with the final ``rank_pattern`` after that) and records the mask in the
        adapter's ``rank_pattern``. peft-kernel's Trainer does this itself (``peft_kernel_training_step``)."""
        if self.rankallocator is None:
            raise ValueError("update_and_allocate needs a trainable AdaLoRA adapter (this model holds adapters in "
                             "inference_mode only).")
        allocator, config = self.rankallocator, self.peft_config[self.trainable_adapter_name]
        final = config.total_step - config.tfinal
        if global_step < final:
            allocator.update_ipt()
            budget, mask = allocator.budget_schedule(global_step)
            if mask:
                config.rank_pattern = allocator.mask_to_budget(budget)
        elif global_step == final:  # the final allocation, from the scores of the steps before
            budget, _ = allocator.budget_schedule(global_step)
            config.rank_pattern = allocator.mask_to_budget(budget)
            allocator.reset_ipt()
        elif config.rank_pattern:
            allocator.mask_using_rank_pattern(config.rank_pattern)

    def orthogonal_regularization(self, adapter_name: str) -> torch.Tensor | float:
        """Mean over the adapter's ``A`` and ``B`` of ``||A Aᵀ - I||_F`` and ``||Bᵀ B - I||_F``."""
        terms = []
        for layer in self.svd_layers().values():
            if adapter_name not in layer.lora_A:
                continue
            for cov in (layer.lora_A[adapter_name] @ layer.lora_A[adapter_name].T,
                        layer.lora_B[adapter_name].T @ layer.lora_B[adapter_name]):
                if cov.numel():
                    terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
        return torch.stack(terms).mean() if terms else 0.0

    def _with_orthogonal_loss(self, outputs: Any) -> Any:
        loss = getattr(outputs, "loss", None)
        if self.trainable_adapter_name is None or not isinstance(loss, torch.Tensor):
            return outputs
        weight = self.peft_config[self.trainable_adapter_name].orth_reg_weight
        if weight <= 0:
            raise ValueError(f"orth_reg_weight should be greater than 0 (AdaLoraConfig.orth_reg_weight={weight}).")
        outputs.loss = loss + weight * self.orthogonal_regularization(self.trainable_adapter_name)
        return outputs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._with_orthogonal_loss(super().forward(*args, **kwargs))  # type: ignore[misc]

    def serve(self, args: tuple, kwargs: dict, adapter_names: Any) -> Any:
        return self._with_orthogonal_loss(super().serve(args, kwargs, adapter_names))  # type: ignore[misc]
