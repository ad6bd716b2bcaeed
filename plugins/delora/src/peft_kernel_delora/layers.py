"""The DeLoRA layer for ``nn.Linear``: an additive low-rank update, normalised and bounded.

For an input ``x`` the adapter adds ``(lambda / r) * B diag(xi) A (w_norm * dropout(x))`` where
``w_norm[j] = |W[:, j]|`` (the base weight's column norms, fixed when the adapter is created and
saved with it), and ``xi_i = 1 / (max(|A[i, :]|, eps) * max(|B[:, i]|, eps))`` normalises each
rank-one component. The update's Frobenius norm is thus bounded by ``|lambda| * |w_norm|``, with
``lambda`` learnable. Imported on first use only (it imports torch).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peft_kernel.plugin_api import AdapterLayer, BufferDict, LowRankFactors, UnsupportedFeatureError, pattern_value
from peft_kernel_delora.config import DeloraConfig
from peft_kernel_lowrank import mixed
from peft_kernel_lowrank.derived import DerivedFactors
from peft_kernel_lowrank.forwards import LowRankForwards

EPS = 1e-4
"""Floor of the rank-one components' norms: a zero ``B`` column (the default init) adds zero."""


class DeloraLinear(LowRankForwards, AdapterLayer):
    """DeLoRA for ``nn.Linear``. ``delora_w_norm`` is a buffer, as in HF PEFT: saved and loaded with
    the adapter (HF's on-disk key), never trained, not counted as a parameter."""

    adapter_layer_names = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")
    other_param_names = ("r", "delora_dropout")
    status_type_names = {"Linear": "DeloraLinear"}

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.out_features, self.in_features = base_layer.weight.shape
        self.r: dict[str, int] = {}
        self.delora_dropout = nn.ModuleDict()
        self.delora_A = nn.ParameterDict()
        self.delora_B = nn.ParameterDict()
        self.delora_lambda = nn.ParameterDict()
        self.delora_w_norm = BufferDict()
        self._factors = DerivedFactors()

    # ---- creation ---------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: DeloraConfig, module_name: str = "") -> None:
        r = pattern_value(config.rank_pattern, module_name, config.r)
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"DeLoRA rank for {module_name!r} must be a positive integer, got {r!r}")
        lam = pattern_value(config.lambda_pattern, module_name, config.delora_lambda)
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        a = torch.empty(r, self.in_features, device=weight.device, dtype=dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = torch.empty(self.out_features, r, device=weight.device, dtype=dtype)
        if config.init_weights:
            nn.init.zeros_(b)
        else:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        self.r[adapter_name] = r
        self.delora_dropout[adapter_name] = nn.Dropout(config.module_dropout) if config.module_dropout > 0 else nn.Identity()
        self.delora_A[adapter_name] = nn.Parameter(a)
        self.delora_B[adapter_name] = nn.Parameter(b)
        self.delora_lambda[adapter_name] = nn.Parameter(torch.tensor([float(lam)], device=weight.device, dtype=dtype))
        w_norm = weight.detach().to(dtype).norm(dim=0)
        self.delora_w_norm[adapter_name] = w_norm

    # ---- bookkeeping ---------------------------------------------------------------------------
    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._factors.drop(adapter_name)
        mixed.drop_stack(self)

    # ---- the update ---------------------------------------------------------------------------
    def _tensors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.delora_A[adapter_name], self.delora_B[adapter_name],
                self.delora_lambda[adapter_name], self.delora_w_norm[adapter_name])

    def _scaled_a(self, adapter_name: str) -> torch.Tensor:
        """``(lambda / r) * diag(xi) A diag(w_norm)`` ``[r, in]``: everything but ``B`` folded into ``A``."""
        a, b, lam, w_norm = self._tensors(adapter_name)
        xi = 1.0 / (a.norm(dim=1).clamp_min(EPS) * b.norm(dim=0).clamp_min(EPS))
        return (lam / self.r[adapter_name]) * xi.unsqueeze(1) * a * w_norm

    def delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        b = self.delora_B[adapter_name]
        x = self.delora_dropout[adapter_name](x.to(b.dtype))
        return (x @ self._scaled_a(adapter_name).T) @ b.T

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self.delora_B[adapter_name] @ self._scaled_a(adapter_name)

    # ---- the low-rank protocol and the fast forwards (see peft_kernel_lowrank.mixed) ----------
    def low_rank_factors(self, adapter_name: str) -> LowRankFactors | None:
        """``(scaled A, delora_B, 1.0)``: lambda, the normalisation and ``w_norm`` are folded into
        ``A``. Without autograd the folded ``A`` is cached until one of its inputs changes (same
        tensor object, so the stacked kernels' freshness check holds). ``None`` for live dropout
        in training and for adapters this layer does not hold."""
        if adapter_name not in self.r:
            return None
        if self.training and not isinstance(self.delora_dropout[adapter_name], nn.Identity):
            return None
        tensors = self._tensors(adapter_name)
        scaled_a = self._factors.get(adapter_name, tensors, lambda: self._scaled_a(adapter_name))
        return scaled_a, tensors[1], 1.0


def make_layer(config: DeloraConfig, adapter_name: str, base_layer: nn.Module, module_name: str) -> DeloraLinear | None:
    """The layer for an ``nn.Linear``; ``None`` (the core's named error) for any other type, as HF
    PEFT supports ``nn.Linear`` only. Quantized linears (integer weights) are refused by name."""
    if not isinstance(base_layer, nn.Linear):
        return None
    if not base_layer.weight.is_floating_point():
        raise UnsupportedFeatureError(
            f"DeLoRA cannot adapt {module_name!r}: its weight is {base_layer.weight.dtype} (quantized); "
            "DeLoRA needs the base weight's column norms, and supports float nn.Linear layers only."
        )
    layer = DeloraLinear(base_layer)
    layer.update_layer(adapter_name, config, module_name)
    return layer
