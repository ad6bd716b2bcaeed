"""HF PEFT's public ``XLoraModel`` methods around the scalings: top-k, global weight, the scaling
pass's value, the latest scalings and their log."""

from __future__ import annotations

from typing import Optional

import torch

from peft_kernel.plugin_api import ConfigError
from peft_kernel_xlora.config import XLoraConfig


class ScalingsApi:
    """Mixed into :class:`~peft_kernel_xlora.host.XLoraModel`; changes are made to its ``xlora_config``."""

    xlora_config: XLoraConfig
    internal_xlora_scalings: Optional[torch.Tensor]
    experts: list[str]
    _scalings_log: list[torch.Tensor]
    _scalings_logging: bool = False

    def set_topk_lora(self, value: Optional[int]) -> None:
        """Keep each token's ``value`` largest expert scalings (``None``: all of them, dense)."""
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"top_k_lora must be None or an integer >= 1; got {value!r}")
        self.xlora_config.top_k_lora = value

    def set_global_scaling_weight(self, weight: float) -> None:
        """Set the factor every expert's output is multiplied by (1 by default)."""
        self.xlora_config.global_scaling_weight = weight

    def get_global_scaling_weight(self) -> float:
        return self.xlora_config.global_scaling_weight

    def set_scaling_pass_value(self, value: Optional[float]) -> None:
        """Set the scaling of every expert in the scaling pass; ``None`` means ``1 / n_experts``."""
        self.xlora_config.scaling_pass_value = 1 / len(self.experts) if value is None else value

    def get_latest_scalings(self) -> Optional[torch.Tensor]:
        """The scalings of the latest forward, ``[batch, seq, n_layers, n_experts]``, or ``None``."""
        return self.internal_xlora_scalings

    def enable_scalings_logging(self) -> None:
        self._scalings_logging = True

    def disable_scalings_logging(self) -> None:
        """Stop logging, keeping the log."""
        self._scalings_logging = False

    def clear_scalings_log(self) -> None:
        self._scalings_log = []

    def get_scalings_log(self) -> list[torch.Tensor]:
        """A copy of the list of logged scalings (the tensors themselves are shared)."""
        return list(self._scalings_log)

    def get_bucketed_scalings_log(self) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        """The logged scalings by sequence length: ``{seq_len: ([positions in the log], [tensors])}``."""
        buckets: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
        for position, scalings in enumerate(self._scalings_log):
            positions, tensors = buckets.setdefault(scalings.shape[1], ([], []))
            positions.append(position)
            tensors.append(scalings)
        return buckets

    def _record_scalings(self, scalings: torch.Tensor) -> None:
        self.internal_xlora_scalings = scalings
        if self._scalings_logging:
            self._scalings_log.append(scalings)
