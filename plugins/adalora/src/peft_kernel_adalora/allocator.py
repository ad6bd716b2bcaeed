"""AdaLoRA's rank allocator: importance scores of the singular triplets and the budget schedule.

For every tensor ``p`` of the trained adapter (``lora_A``, ``lora_B``, ``lora_E`` of each layer),
after the backward pass of a step:

- sensitivity ``I = |p * grad p|`` (element-wise),
- its EMA ``Ī ← β1 Ī + (1 - β1) I`` and the EMA of its uncertainty ``Ū ← β2 Ū + (1 - β2) |I - Ī|``,
- element score ``s = Ī * Ū``.

Triplet ``i`` of a layer scores ``s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)``. The budget (kept
triplets over all layers) is ``init_r * layers`` up to step ``tinit``, then falls cubically to
``target_r * layers`` at step ``total_step - tfinal``; every ``deltaT`` steps in between, and once
at the end, the ``E`` entries of all triplets scoring at or below the ``(total - budget)``-th
smallest score are set to zero. Imported on first use only (it imports torch).
"""

from __future__ import annotations

import torch

from peft_kernel_adalora.config import FACTORS, AdaLoraConfig
from peft_kernel_adalora.layers import SVDLayer


class RankAllocator:
    """The importance statistics and the budget of one trained adapter over ``layers``
    (``{module path: SVDLayer}``)."""

    def __init__(self, layers: dict[str, SVDLayer], config: AdaLoraConfig, adapter_name: str) -> None:
        self.config = config
        self.adapter_name = adapter_name
        self.layers = {path: layer for path, layer in layers.items() if adapter_name in layer.lora_E}
        self.init_bgt = sum(layer.lora_E[adapter_name].shape[0] for layer in self.layers.values())
        self.target_bgt = config.target_r * len(self.layers)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        """Forget the importance statistics."""
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    def _tensors(self) -> list[tuple[tuple[str, str], torch.Tensor]]:
        return [((path, factor), getattr(layer, factor)[self.adapter_name])
                for path, layer in self.layers.items() for factor in FACTORS]

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """``(budget, whether to mask at this step)``."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        remaining = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_bgt - self.target_bgt) * remaining**3 + self.target_bgt)
        return budget, step % c.deltaT == 0

    @torch.no_grad()
    def update_ipt(self) -> None:
        """Fold this step's sensitivities (the tensors' current gradients) into the EMAs."""
        b1, b2 = self.config.beta1, self.config.beta2
        for key, p in self._tensors():
            if p.grad is None:
                continue
            ipt = (p * p.grad).abs()
            avg = self.exp_avg_ipt.get(key, torch.zeros_like(p))
            unc = self.exp_avg_unc.get(key, torch.zeros_like(p))
            avg = b1 * avg + (1 - b1) * ipt
            self.exp_avg_ipt[key] = avg
            self.exp_avg_unc[key] = b2 * unc + (1 - b2) * (ipt - avg).abs()

    def _score(self, key: tuple[str, str], p: torch.Tensor) -> torch.Tensor:
        if key not in self.exp_avg_ipt:
            return torch.zeros_like(p)
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """``{module path: [r]}`` scores of each layer's triplets."""
        scores = {}
        for path, layer in self.layers.items():
            parts = {factor: self._score((path, factor), getattr(layer, factor)[self.adapter_name]) for factor in FACTORS}
            scores[path] = parts["lora_E"].view(-1) + parts["lora_A"].mean(dim=1) + parts["lora_B"].mean(dim=0)
        return scores

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero the ``E`` entries of the lowest-scoring triplets so ``budget`` remain (ties at the
        threshold are masked too); returns the kept-triplet masks as ``rank_pattern``."""
        scores = self.triplet_scores()
        if not scores:
            return {}
        every = torch.cat(list(scores.values()))
        k = self.init_bgt - budget
        threshold = torch.kthvalue(every, k).values.item() if k > 0 else -float("inf")
        pattern = {}
        for path, layer in self.layers.items():
            dropped = scores[path] <= threshold
            layer.lora_E[self.adapter_name].masked_fill_(dropped.view(-1, 1), 0.0)
            pattern[f"{path}.lora_E"] = (~dropped).tolist()
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self, rank_pattern: dict[str, list[bool]]) -> None:
        """Keep the ``E`` entries ``rank_pattern`` drops at zero (after the final allocation). A layer
        loaded from a checkpoint holds the kept triplets only (fewer than its mask): nothing to mask."""
        for path, layer in self.layers.items():
            kept = rank_pattern.get(f"{path}.lora_E")
            e = layer.lora_E[self.adapter_name]
            if kept is not None and len(kept) == e.shape[0]:
                e.masked_fill_(~torch.tensor(kept, dtype=torch.bool, device=e.device).view(-1, 1), 0.0)
