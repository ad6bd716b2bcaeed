"""The RandLora layer for ``nn.Linear`` and transformers' ``Conv1D``: a full-rank additive update
``(alpha / r) * sum_i B_i diag(lambda[:, i]) A diag(gamma[i])`` from the model's shared frozen bases
``A`` [r, 1, m_max] and ``B`` [M_max, n_max, r], sliced to the layer's smaller side ``m`` and larger
side ``M``. It is a low-rank product of rank ``k = r * n``: ``B[:M, :n].reshape(M, k)`` times the
rows ``lambda[j, i] * A[j] * gamma[i]`` (row ``j * n + i``), times ``scale = alpha / r``, transposed where the layer's
output is its smaller side. Imported on first use (torch)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from peft_kernel.plugin_api import BufferDict, linear_fan_in_fan_out
from peft_kernel_lowrank.mixed import can_add_inplace
from peft_kernel_lowrank.projections import (
    ProjectionLayer,
    largest_features,
    leading,
    seeded_generator,
    ternary,
    unit_std,
)
from peft_kernel_lowrank.shared_mixed import Rows
from peft_kernel_randlora.config import RandLoraConfig

SETTINGS = ("r", "projection_prng_key", "save_projection", "sparse", "very_sparse")
"""Config fields every RandLora adapter of one model must share (HF PEFT requires the first three
and silently gives later adapters the first one's bases, whatever their ``sparse``: refused here)."""


def num_bases(smaller_side: int, r: int) -> int:
    """``n``: how many rank-``r`` bases cover a layer whose smaller side is ``smaller_side``."""
    return math.ceil(smaller_side / r)


def make_bases(config: RandLoraConfig, targets: list[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
    """``randlora_A`` [r, 1, m] then ``randlora_B`` [M, n, r] (``m`` / ``M`` the smaller / larger
    of the largest targeted output and input sizes, ``n = ceil(m / r)``), drawn in that order from
    ``projection_prng_key`` and scaled to unit standard deviation, bit-identically to HF PEFT:
    uniform draws in bfloat16 (bounds ``1/sqrt(m)`` and ``1/sqrt(r)``, ``B`` drawn basis-major), or
    ternary float32 draws with ``sparse`` (probability 1/6 each for -1 and +1) and ``very_sparse``
    (``1 / (2 sqrt(m))`` each; it wins when both are set, as in HF PEFT)."""
    out_max, in_max = largest_features(targets, "RandLora")
    small, large, r = min(out_max, in_max), max(out_max, in_max), config.r
    n = num_bases(small, r)
    generator = seeded_generator(config.projection_prng_key)
    if config.sparse or config.very_sparse:
        p = 1 / (2 * math.sqrt(small)) if config.very_sparse else 1 / 6
        base_a = ternary((r, 1, small), p, generator)
        base_b = ternary((large, n, r), p, generator)
    else:
        bound_a, bound_b = 1 / math.sqrt(small), 1 / math.sqrt(r)
        base_a = torch.empty(r, 1, small, dtype=torch.bfloat16).uniform_(-bound_a, bound_a, generator=generator)
        base_b = torch.empty(n, large, r, dtype=torch.bfloat16).uniform_(-bound_b, bound_b, generator=generator)
        base_b = base_b.permute(1, 0, 2)
    return {"randlora_A": unit_std(base_a), "randlora_B": unit_std(base_b).contiguous()}


class RandLoraLinear(ProjectionLayer):
    """RandLora for a linear layer. ``randlora_A`` / ``randlora_B`` are buffers shared by every layer
    of the adapter (``shared_tensor_names``)."""

    adapter_layer_names = ("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B")
    shared_tensor_names = ("randlora_A", "randlora_B")
    other_param_names = ("randlora_dropout", "scaling")
    dense_mixed_batches = True  # rank k reaches the smaller side: see peft_kernel_lowrank.dense_mixed
    shared_max_tokens = 32
    """Longer mixed batches (prefill) use each adapter group's cached dense ``delta W``: the shared
    path's ``gamma`` contraction costs about one more ``m x m`` product per token, the dense path
    one ``delta W`` read per adapter (measured crossover between 16 and 64 tokens at hidden 512)."""
    dropout_name = "randlora_dropout"

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, fan_in_fan_out)
        self.small, self.large = sorted((self.out_features, self.in_features))
        self.randlora_dropout = nn.ModuleDict()
        self.randlora_lambda = nn.ParameterDict()
        self.randlora_gamma = nn.ParameterDict()
        self.randlora_A = BufferDict()
        self.randlora_B = BufferDict()
        self.scaling: dict[str, float] = {}
        self._module_name = ""

    def update_layer(self, adapter_name: str, config: RandLoraConfig, module_name: str = "", shared: Any = None) -> None:
        self._module_name = module_name
        r = config.r
        n = num_bases(self.small, r)
        self._slices(shared["randlora_A"], shared["randlora_B"], r, n)  # a too-small base fails here, named
        device, dtype = shared["randlora_A"].device, self.adapter_dtype()
        if config.init_weights:
            lam = torch.zeros(r, n)
            gamma = torch.full((n, self.small), 1 / self.small)
        else:
            lam = torch.randn(r, n)
            gamma = torch.full((n, self.small), 1 / self.large)
        self.randlora_dropout[adapter_name] = (
            nn.Dropout(config.randlora_dropout) if config.randlora_dropout > 0 else nn.Identity())
        self.randlora_lambda[adapter_name] = nn.Parameter(lam.to(device, dtype))
        self.randlora_gamma[adapter_name] = nn.Parameter(gamma.to(device, dtype))
        self.randlora_A[adapter_name] = shared["randlora_A"]
        self.randlora_B[adapter_name] = shared["randlora_B"]
        self.scaling[adapter_name] = config.randlora_alpha / r
        self.projection_settings[adapter_name] = {field: getattr(config, field) for field in SETTINGS}

    def _slices(self, base_a: torch.Tensor, base_b: torch.Tensor, r: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``A[:r, 0, :m]`` [r, m] and ``B[:M, :n, :r]`` as [M, n * r]."""
        a = leading(base_a, (r, 1, self.small), "randlora_A", self._module_name)[:, 0]
        b = leading(base_b, (self.large, n, r), "randlora_B", self._module_name)
        return a, b.reshape(self.large, n * r)

    def scale(self, adapter_name: str) -> float:
        return self.scaling[adapter_name]

    def shared_projections(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [r, m], B [M, k])`` (:meth:`_slices`)."""
        r, n = self.randlora_lambda[adapter_name].shape
        return self._slices(self.randlora_A[adapter_name], self.randlora_B[adapter_name], r, n)

    def shared_vectors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale * lambda`` flattened ``[k]`` (entry ``j * n + i``), ``gamma [n, m])``."""
        lam = self.randlora_lambda[adapter_name]
        return lam.reshape(-1) * self.scaling[adapter_name], self.randlora_gamma[adapter_name]

    def shared_mixed_add(self, result: torch.Tensor, x: torch.Tensor, projections: tuple[torch.Tensor, ...],
                         stacks: tuple[torch.Tensor, ...], rows: Rows) -> torch.Tensor:
        """Row ``j * n + i`` of the folded ``A'`` is ``lambda[j, i] * A[j] * gamma[i]``, so with the
        layer's smaller side as its input (``m = in``) a token's update is
        ``B @ (scale * lambda * u)`` with ``u[j, i] = gamma[i] . (A[j] * x)``: ``A[j] * x`` for every
        token at once, ``u`` by one ``[rows, tokens, r, m] @ gamma.T`` product per adapter group, ``B``
        once for every token. With the smaller side as output (``m = out``) the same in reverse:
        ``w = scale * lambda * (x @ B)`` for every token, ``g[j] = w[j] @ gamma`` per adapter
        group, ``sum_j A[j] * g[j]``."""
        a, b = projections
        lam_rows = stacks[0].index_select(0, rows.slots).unsqueeze(1)  # [batch, 1, k]
        gamma = stacks[1]
        (batch, tokens, _), (r, m), k = x.shape, a.shape, b.shape[1]
        n = k // r
        if self.out_features >= self.in_features:
            xa = x.unsqueeze(2) * a  # [batch, tokens, r, m]
            u = x.new_zeros(batch, tokens, r, n)
            for slot, index in rows.groups:
                u.index_copy_(0, index, xa.index_select(0, index) @ gamma[slot].T)
            w = u.view(batch, tokens, k) * lam_rows
            if can_add_inplace(result):
                result.view(batch * tokens, -1).addmm_(w.view(batch * tokens, k), b.T)
                return result
            return result + w @ b.T
        w = ((x @ b) * lam_rows).view(batch, tokens, r, n)
        g = x.new_zeros(batch, tokens, r, m)
        for slot, index in rows.groups:
            g.index_copy_(0, index, w.index_select(0, index) @ gamma[slot])
        delta = (g * a).sum(2)
        if can_add_inplace(result):
            return result.add_(delta)
        return result + delta

    def fold_inputs(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        return (self.randlora_lambda[adapter_name], self.randlora_gamma[adapter_name],
                self.randlora_A[adapter_name], self.randlora_B[adapter_name])

    def fold(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors in float32 at least, also for half-precision adapters: HF PEFT computes
        RandLora's update in float32 and adds it to the base output before rounding once."""
        lam, gamma, base_a, base_b = self.fold_inputs(adapter_name)
        dtype = torch.promote_types(lam.dtype, torch.float32)
        lam, gamma = lam.to(dtype), gamma.to(dtype)
        r, n = lam.shape
        a, b = self._slices(base_a, base_b, r, n)
        rows = (lam.reshape(-1, 1) * a.to(dtype).repeat_interleave(n, 0)) * gamma.repeat(r, 1)
        b = b.to(dtype)
        if self.out_features >= self.in_features:  # update [out = M, in = m] = b @ rows
            return rows, b
        return b.T, rows.T  # update [out = m, in = M] = rows.T @ b.T


def make_layer(config: RandLoraConfig, adapter_name: str, base_layer: nn.Module, module_name: str,
               shared: Any = None) -> RandLoraLinear | None:
    """The layer for an ``nn.Linear`` or ``Conv1D``; ``None`` (the core's named error) for any
    other type, as HF PEFT supports linear layers only."""
    fan_in_fan_out = linear_fan_in_fan_out(config, base_layer)
    if fan_in_fan_out is None:
        return None
    layer = RandLoraLinear(base_layer, fan_in_fan_out)
    layer.update_layer(adapter_name, config, module_name, shared=shared)
    return layer
