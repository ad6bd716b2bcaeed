"""LoKr adapter layers for ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` (what HF PEFT supports).

The output size is split as ``out = out_l * out_k`` and the input size as ``in = in_m * in_n``
(:func:`factorization`); ``delta W = kron(w1 [out_l, in_m], w2 [out_k, in_n, *kernel]) * alpha / r``.

* ``w1`` is ``lokr_w1``, or ``lokr_w1_a @ lokr_w1_b`` with ``decompose_both`` when
  ``r < max(out_l, in_m) / 2``.
* ``w2`` is ``lokr_w2`` when ``r >= max(out_k, in_n) / 2``; otherwise ``lokr_w2_a @ lokr_w2_b``
  (for a conv: ``[out_k, r] @ [r, in_n * k...]``), or with ``use_effective_conv2d`` and a kernel
  larger than 1 the Tucker product ``lokr_t2 [r, r, *k] x lokr_w2_a [r, out_k] x lokr_w2_b [r, in_n]``.

On a Linear base the forward never builds ``delta W``: :func:`~peft_kernel_lycoris.kron.kron_apply`
multiplies by ``w1`` and ``w2`` directly, and mixed batches run all rows at once on stacked factors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peft_kernel.plugin_api import Routing
from peft_kernel_lokr.config import LoKrConfig
from peft_kernel_lycoris.kron import Factors, KronStack, kron_apply, kron_apply_rows
from peft_kernel_lycoris.layer import SUPPORTED_BASE_LAYERS, LycorisLayer, conv_core_shape, kaiming_uniform, tucker


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)`` with ``m * n == dimension`` (LyCORIS's rule, as HF).

    A positive ``factor`` that divides ``dimension`` gives ``(factor, dimension // factor)`` as is.
    Otherwise the split is the most balanced one, ``m <= n``, whose smaller side does not exceed
    ``factor`` (no limit for ``-1``; ``0`` or another negative value allows no split: ``(1, dimension)``).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    # walk the divisors upwards while the pair is unbalanced (m < n) and m stays within the limit
    candidate = 2
    while m < n:
        while dimension % candidate:
            candidate += 1
        if candidate > limit:
            break
        m, n = candidate, dimension // candidate
        candidate += 1
    return (n, m) if m > n else (m, n)


class LoKrLayer(LycorisLayer):
    """LoKr on a Linear / Conv1d / Conv2d base layer."""

    adapter_layer_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict())
        self._kron_stack = KronStack()

    def create_adapter(self, adapter_name: str, r: int, config: LoKrConfig) -> None:
        out_l, out_k = factorization(self.out_features, config.decompose_factor)
        in_m, in_n = factorization(self.in_features, config.decompose_factor)
        kernel = self.kernel_size
        if config.decompose_both and r < max(out_l, in_m) / 2:
            self.lokr_w1_a[adapter_name] = nn.Parameter(torch.empty(out_l, r))
            self.lokr_w1_b[adapter_name] = nn.Parameter(torch.empty(r, in_m))
        else:
            self.lokr_w1[adapter_name] = nn.Parameter(torch.empty(out_l, in_m))
        if r >= max(out_k, in_n) / 2:
            self.lokr_w2[adapter_name] = nn.Parameter(torch.empty(out_k, in_n, *kernel))
        elif self.is_conv and config.use_effective_conv2d and any(k != 1 for k in kernel):
            self.lokr_t2[adapter_name] = nn.Parameter(torch.empty(conv_core_shape(r, kernel)))
            self.lokr_w2_a[adapter_name] = nn.Parameter(torch.empty(r, out_k))
            self.lokr_w2_b[adapter_name] = nn.Parameter(torch.empty(r, in_n))
        else:
            self.lokr_w2_a[adapter_name] = nn.Parameter(torch.empty(out_k, r))
            self.lokr_w2_b[adapter_name] = nn.Parameter(torch.empty(r, in_n * int(torch.Size(kernel).numel())))

    def reset_adapter(self, adapter_name: str, init_weights: bool | str) -> None:
        """Kaiming-uniform everywhere, then (HF's choices) ``init_weights=True`` zeroes ``w1``
        (``lokr_w1`` or ``lokr_w1_a``) and ``"lycoris"`` zeroes ``w2`` (``lokr_w2`` or ``lokr_w2_b``),
        so the adapter starts as the identity; ``False`` leaves it random."""
        with torch.no_grad():
            for p in self.adapter_parameters(adapter_name):
                kaiming_uniform(p)
            if init_weights == "lycoris":
                zero = self._param("lokr_w2", adapter_name)
                zero = zero if zero is not None else self.lokr_w2_b[adapter_name]
            elif init_weights:
                zero = self._param("lokr_w1", adapter_name)
                zero = zero if zero is not None else self.lokr_w1_a[adapter_name]
            else:
                return
            nn.init.zeros_(zero)

    def _w1(self, adapter_name: str) -> torch.Tensor:
        w1 = self._param("lokr_w1", adapter_name)
        return w1 if w1 is not None else self.lokr_w1_a[adapter_name] @ self.lokr_w1_b[adapter_name]

    def _w2(self, adapter_name: str) -> torch.Tensor:
        w2 = self._param("lokr_w2", adapter_name)
        if w2 is not None:
            return w2
        core = self._param("lokr_t2", adapter_name)
        if core is not None:
            return tucker(core, self.lokr_w2_a[adapter_name], self.lokr_w2_b[adapter_name])
        return self.lokr_w2_a[adapter_name] @ self.lokr_w2_b[adapter_name]

    def raw_delta_weight(self, adapter_name: str) -> torch.Tensor:
        w1, w2 = self._w1(adapter_name), self._w2(adapter_name)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        # A whole Conv1d w2 is 3-d [out_k, in_n, k] while w1 stays 2-d; torch.kron then reads w1 as
        # [1, out_l, in_m]. HF PEFT computes it this way, so adapters trained there keep their outputs.
        return torch.kron(w1.contiguous(), w2.contiguous()).reshape(self.base_layer.weight.shape)

    # ---- Linear forwards without delta W -------------------------------------------------------
    def _dropout_live(self, adapter_name: str) -> bool:
        return self.training and bool(self.rank_dropout[adapter_name] or self.module_dropout[adapter_name])

    def kron_factors(self, adapter_name: str) -> Factors | None:
        """``(w1 * scaling, w2)`` of a Linear adapter, or ``None`` where the dense delta must run (a
        conv, live rank or module dropout: HF's random draws)."""
        if self.is_conv or self._dropout_live(adapter_name):
            return None
        return self._w1(adapter_name) * self.scaling[adapter_name], self._w2(adapter_name)

    def adapted_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.is_conv or args or kwargs:
            return super().adapted_forward(x, adapters, *args, **kwargs)
        result = self.base_layer(x)
        dtype = result.dtype
        for name in adapters:
            factors = self.kron_factors(name)
            if factors is None:
                delta = self.delta(x, name)
            else:
                delta = kron_apply(x.to(factors[0].dtype), *factors)
            if delta is not None:  # summed in the adapter's dtype, rounded once (as HF PEFT)
                result = result + delta
        return result.to(dtype)

    def mixed_forward(self, x: torch.Tensor, routing: Routing, *args: Any, **kwargs: Any) -> torch.Tensor:
        """All rows at once on the stacked factors; the core's per-adapter groups where the stack
        cannot run (convs, live dropout, adapters of different factor shapes)."""
        stack = None
        if not (self.is_conv or args or kwargs) and x.is_floating_point():
            stack = routing.memo(("peft_kernel_lycoris.kron", id(self)), self._current_stack)
        if stack is None:
            return super().mixed_forward(x, routing, *args, **kwargs)
        names, w1s, w2s = stack
        slots = routing.slots(x.shape[0], x.device, names)
        slots = torch.where(slots < 0, len(names), slots)
        result = self.base_layer(x)
        return (result + kron_apply_rows(x.to(w1s.dtype), w1s, w2s, slots)).to(result.dtype)

    def _current_stack(self) -> tuple[tuple[str, ...], torch.Tensor, torch.Tensor] | None:
        names = tuple(self.adapter_names())
        if not names or any(self._dropout_live(n) for n in names):
            return None
        sources = tuple(p for n in names for p in self.adapter_parameters(n))
        scalings = tuple(self.scaling[n] for n in names)
        return self._kron_stack.get(names, scalings, sources, lambda: {n: self.kron_factors(n) for n in names})


def make_layer(config: LoKrConfig, adapter_name: str, base_layer: nn.Module, module_name: str) -> LoKrLayer | None:
    """The LoKr layer for ``base_layer`` with ``adapter_name`` added, or None for unsupported types."""
    if not isinstance(base_layer, SUPPORTED_BASE_LAYERS):
        return None
    layer = LoKrLayer(base_layer)
    layer.update_layer(adapter_name, config, module_name)
    return layer
