"""The VeRA layer for ``nn.Linear`` and transformers' ``Conv1D``: an additive low-rank update
``diag(vera_lambda_b) B diag(vera_lambda_d) A`` from the model's shared frozen projections ``A``
[r, in_max] and ``B`` [out_max, r], sliced to the layer's shape. Imported on first use (torch)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peft_kernel.plugin_api import BufferDict, linear_fan_in_fan_out
from peft_kernel_lowrank.mixed import can_add_inplace
from peft_kernel_lowrank.projections import ProjectionLayer, kaiming_uniform, largest_features, leading, seeded_generator
from peft_kernel_lowrank.shared_mixed import Rows
from peft_kernel_vera.config import VeraConfig

SETTINGS = ("r", "projection_prng_key", "save_projection")
"""Config fields every VeRA adapter of one model must share (HF PEFT's rule)."""


def make_projections(config: VeraConfig, targets: list[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
    """``vera_A`` [r, in_max] then ``vera_B`` [out_max, r], drawn in that order from
    ``projection_prng_key`` (bit-identical to HF PEFT's), sized for the largest targeted layer."""
    out_max, in_max = largest_features(targets, "VeRA")
    generator = seeded_generator(config.projection_prng_key)
    vera_a = kaiming_uniform((config.r, in_max), generator)
    vera_b = kaiming_uniform((out_max, config.r), generator)
    return {"vera_A": vera_a, "vera_B": vera_b}


class VeraLinear(ProjectionLayer):
    """VeRA for a linear layer. ``vera_A`` / ``vera_B`` are buffers shared by every layer of the
    adapter (``shared_tensor_names``), saved once at the model as HF PEFT saves them."""

    adapter_layer_names = ("vera_lambda_b", "vera_lambda_d", "vera_A", "vera_B")
    shared_tensor_names = ("vera_A", "vera_B")
    other_param_names = ("vera_dropout",)
    dropout_name = "vera_dropout"
    shared_max_tokens = 256
    """Longer mixed batches (prefill) take the stacked kernels: the shared path's ``lambda_b``
    product is one more pass over the ``[tokens, out]`` output (measured crossover near 256 tokens
    at hidden 512)."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, fan_in_fan_out)
        self.vera_dropout = nn.ModuleDict()
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_A = BufferDict()
        self.vera_B = BufferDict()
        self._module_name = ""

    def update_layer(self, adapter_name: str, config: VeraConfig, module_name: str = "", shared: Any = None) -> None:
        self._module_name = module_name
        leading(shared["vera_A"], (config.r, self.in_features), "vera_A", module_name)
        leading(shared["vera_B"], (self.out_features, config.r), "vera_B", module_name)
        device, dtype = shared["vera_A"].device, self.adapter_dtype()
        if config.init_weights:
            lambda_b = torch.zeros(self.out_features)
            lambda_d = torch.full((config.r,), float(config.d_initial))
        else:
            lambda_b = torch.ones(self.out_features)
            lambda_d = torch.randn(config.r)
        self.vera_dropout[adapter_name] = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else nn.Identity()
        self.vera_lambda_b[adapter_name] = nn.Parameter(lambda_b.to(device, dtype))
        self.vera_lambda_d[adapter_name] = nn.Parameter(lambda_d.to(device, dtype))
        self.vera_A[adapter_name] = shared["vera_A"]
        self.vera_B[adapter_name] = shared["vera_B"]
        self.projection_settings[adapter_name] = {field: getattr(config, field) for field in SETTINGS}

    def fold_inputs(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        return (self.vera_lambda_b[adapter_name], self.vera_lambda_d[adapter_name],
                self.vera_A[adapter_name], self.vera_B[adapter_name])

    def delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``lambda_b * B(lambda_d * A(dropout(x)))`` in that order, as HF PEFT computes it (so
        half-precision adapters round as HF's do); the fast paths use the folded factors."""
        lambda_b, lambda_d, vera_a, vera_b = self.fold_inputs(adapter_name)
        r = lambda_d.shape[0]
        a = leading(vera_a, (r, self.in_features), "vera_A", self._module_name).to(lambda_d.dtype)
        b = leading(vera_b, (self.out_features, r), "vera_B", self._module_name).to(lambda_b.dtype)
        x = self.vera_dropout[adapter_name](x.to(lambda_d.dtype))
        return lambda_b * F.linear(lambda_d * F.linear(x, a), b)

    def shared_projections(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A[:r, :in], B[:out, :r])``."""
        r = self.vera_lambda_d[adapter_name].shape[0]
        return (leading(self.vera_A[adapter_name], (r, self.in_features), "vera_A", self._module_name),
                leading(self.vera_B[adapter_name], (self.out_features, r), "vera_B", self._module_name))

    def shared_vectors(self, adapter_name: str) -> tuple[torch.Tensor]:
        """``[lambda_d, lambda_b]`` end to end (one gather per forward serves both)."""
        return (torch.cat([self.vera_lambda_d[adapter_name], self.vera_lambda_b[adapter_name]]),)

    def shared_mixed_add(self, result: torch.Tensor, x: torch.Tensor, projections: tuple[torch.Tensor, ...],
                         stacks: tuple[torch.Tensor, ...], rows: Rows) -> torch.Tensor:
        """``lambda_b[row] * B(lambda_d[row] * A(x))``: the two projection GEMMs once for every
        token, each row's vectors gathered from the stack, in HF PEFT's order of operations."""
        a, b = projections
        vectors = stacks[0].index_select(0, rows.slots).unsqueeze(1)  # [batch, 1, r + out]
        lambda_d, lambda_b = vectors[..., : a.shape[0]], vectors[..., a.shape[0]:]
        u = F.linear(x, a)
        u = u.mul_(lambda_d) if not torch.is_grad_enabled() else u * lambda_d
        v = F.linear(u, b)
        if can_add_inplace(result):
            return result.addcmul_(v, lambda_b)
        return result + v * lambda_b

    def fold(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(diag(lambda_d) A[:r, :in], diag(lambda_b) B[:out, :r])``."""
        lambda_b, lambda_d, vera_a, vera_b = self.fold_inputs(adapter_name)
        r = lambda_d.shape[0]
        a = leading(vera_a, (r, self.in_features), "vera_A", self._module_name)
        b = leading(vera_b, (self.out_features, r), "vera_B", self._module_name)
        return lambda_d.unsqueeze(1) * a.to(lambda_d.dtype), lambda_b.unsqueeze(1) * b.to(lambda_b.dtype)


def make_layer(config: VeraConfig, adapter_name: str, base_layer: nn.Module, module_name: str,
               shared: Any = None) -> VeraLinear | None:
    """The layer for an ``nn.Linear`` or ``Conv1D``; ``None`` (the core's named error) for any
    other type, as HF PEFT supports linear layers only."""
    fan_in_fan_out = linear_fan_in_fan_out(config, base_layer)
    if fan_in_fan_out is None:
        return None
    layer = VeraLinear(base_layer, fan_in_fan_out)
    layer.update_layer(adapter_name, config, module_name, shared=shared)
    return layer
