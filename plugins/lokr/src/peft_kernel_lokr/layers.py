"""LoKr adapter layers for ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` (what HF PEFT supports).

The output size is split as ``out = out_l * out_k`` and the input size as ``in = in_m * in_n``
(:func:`factorization`); ``delta W = kron(w1 [out_l, in_m], w2 [out_k, in_n, *kernel]) * alpha / r``.

* ``w1`` is ``lokr_w1``, or ``lokr_w1_a @ lokr_w1_b`` with ``decompose_both`` when
  ``r < max(out_l, in_m) / 2``.
* ``w2`` is ``lokr_w2`` when ``r >= max(out_k, in_n) / 2``; otherwise ``lokr_w2_a @ lokr_w2_b``
  (for a conv: ``[out_k, r] @ [r, in_n * k...]``), or with ``use_effective_conv2d`` and a kernel
  larger than 1 the Tucker product ``lokr_t2 [r, r, *k] x lokr_w2_a [r, out_k] x lokr_w2_b [r, in_n]``.
"""

from __future__ import annotations

import torch
from torch import nn

from peft_kernel_lokr.config import LoKrConfig
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


def make_layer(config: LoKrConfig, adapter_name: str, base_layer: nn.Module, module_name: str) -> LoKrLayer | None:
    """The LoKr layer for ``base_layer`` with ``adapter_name`` added, or None for unsupported types."""
    if not isinstance(base_layer, SUPPORTED_BASE_LAYERS):
        return None
    layer = LoKrLayer(base_layer)
    layer.update_layer(adapter_name, config, module_name)
    return layer
