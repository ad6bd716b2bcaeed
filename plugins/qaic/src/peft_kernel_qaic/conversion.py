"""Serving adapters of other additive methods (LoHa, LoKr, VeRA, ...) as LoRA on the card.

A method whose record declares the ``additive`` capability changes each weight by a fixed
``delta_weight`` (``W' = W + ΔW``), so the core's ``convert_to_lora`` (HF PEFT 0.21's API, from the
LoRA plugin) rewrites it as a LoRA: the truncated SVD of ``ΔW`` at a chosen rank, with each layer's
relative error ``‖ΔW - BA‖_F / ‖ΔW‖_F``. The graph then stacks that LoRA like any other. Other
methods (IA3, OFT, BOFT, HRA, RoAd...) scale or rotate ``W``: no LoRA reproduces them, and they are
refused with an error saying so.

``rank`` is an ``int`` (the LoRA rank of every converted layer) or a ``float`` in (0, 1] (per layer,
the smallest rank keeping that share of the squared singular values), as in ``convert_to_lora``.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
from torch import nn

from peft_kernel_qaic.errors import AdapterLoadError

DEFAULT_CONVERT_RANK = 16
"""The rank a non-LoRA adapter is converted at when ``convert_rank`` is not given."""

logger = logging.getLogger(__name__)


@attrs.frozen
class ConversionReport:
    """How a non-LoRA adapter was turned into the LoRA the graph serves.

    ``errors`` maps each converted module to its relative error ``‖ΔW - BA‖_F / ‖ΔW‖_F``
    (0 where ``rank`` reaches the true rank of ``ΔW``); ``ranks`` to the rank it got.
    """

    adapter: str
    method: str
    rank: int | float
    errors: dict[str, float]
    ranks: dict[str, int]

    @property
    def worst(self) -> float:
        return max(self.errors.values(), default=0.0)

    def __str__(self) -> str:
        rows = [f"  {m}: rank {self.ranks.get(m)}, relative error {e:.2e}" for m, e in sorted(self.errors.items())]
        head = (f"{self.method} adapter {self.adapter!r} converted to LoRA (rank={self.rank!r}): worst relative "
                f"error {self.worst:.2e} over {len(self.errors)} layers")
        return "\n".join([head, *rows])


def check_rank(rank: Any) -> int | float:
    """``rank`` if it is a positive ``int`` or a ``float`` in (0, 1]; else :class:`AdapterLoadError`."""
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise AdapterLoadError(
            f"convert_rank must be an int (the LoRA rank) or a float in (0, 1] (the share of squared singular "
            f"values kept per layer), got {rank!r}"
        )
    if isinstance(rank, int) and rank <= 0:
        raise AdapterLoadError(f"convert_rank must be a positive rank, got {rank}")
    if isinstance(rank, float) and not 0.0 < rank <= 1.0:
        raise AdapterLoadError(f"convert_rank as a float is a threshold in (0, 1], got {rank}")
    return rank


def peft_type_name(peft_type: Any) -> str:
    return str(getattr(peft_type, "value", peft_type) or "").upper().split(".")[-1]


def check_convertible(peft_type: Any, where: str) -> None:
    """Raise :class:`AdapterLoadError` unless ``peft_type`` is an installed method declaring ``additive``."""
    from peft_kernel import PeftKernelError
    from peft_kernel.plugin_api import get_registry

    name = peft_type_name(peft_type)
    try:
        record = get_registry().method(name)
    except PeftKernelError as exc:
        raise AdapterLoadError(f"cannot load adapter {where}: {exc}") from None
    if not record.supports("additive"):
        raise AdapterLoadError(
            f"adapter {where} is a {name!r} adapter, which the qaic backend cannot serve: {name} is not additive "
            "(it scales or rotates the base weight, W' = W·R, instead of adding a fixed ΔW), so no LoRA -- and no "
            "convert_to_lora -- reproduces it. Merge it into the base model (merge_and_unload) and export that."
        )


def convert_adapter(peft_model: nn.Module, adapter_name: str, name: str, method: str,
                    rank: int | float, where: str) -> tuple[Any, dict, ConversionReport]:
    """``convert_to_lora_with_errors`` on ``peft_model``'s adapter: ``(LoraConfig, state_dict, report)``.

    ``state_dict`` has HF PEFT's LoRA keys (``base_model.model.<module>.lora_A.weight``) and the
    scaling is 1 (``lora_alpha == r``)."""
    import peft_kernel

    try:
        config, state_dict, errors = peft_kernel.convert_to_lora_with_errors(peft_model, rank, adapter_name=adapter_name)
    except (TypeError, ValueError) as exc:
        raise AdapterLoadError(f"cannot convert adapter {where} to LoRA (convert_rank={rank!r}): {exc}") from None
    ranks = {m: int(config.rank_pattern.get(m, config.r)) for m in errors}
    report = ConversionReport(adapter=name, method=method, rank=rank, errors=dict(errors), ranks=ranks)
    logger.info("%s", report)
    return config, state_dict, report
