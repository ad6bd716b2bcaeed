"""LoHa adapter layers for ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` (what HF PEFT supports).

``delta W = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r`` (a Hadamard product of two rank-``r``
products, so the delta can have rank up to ``r**2``). For a conv kernel the products are
``[out, in * k...]`` reshaped to the kernel; with ``use_effective_conv2d`` (kernel larger than 1)
each product is instead a Tucker product ``core [r, r, *k] x w_a [r, out] x w_b [r, in]``.

On a Linear base the same delta is exactly low rank (``r**2``): with the face-splitting products
``U[o, (a, b)] = w1_a[o, a] * w2_a[o, b]`` and ``V[(a, b), i] = w1_b[a, i] * w2_b[b, i]``,
``delta W = U @ V * alpha / r``. Where that product is cheaper than the dense delta
(:func:`factored_is_cheaper`), :meth:`LoHaLayer.low_rank_factors` returns ``(V, U, alpha / r)`` and
the low-rank family's kernels run LoHa: one adapter without rebuilding ``delta W`` on every forward
(HF PEFT rebuilds it), and mixed batches stacked, one kernel for all rows.
"""

from __future__ import annotations

import torch
from torch import nn

from peft_kernel_loha.config import LoHaConfig
from peft_kernel.plugin_api import LowRankFactors
from peft_kernel_lowrank.derived import DerivedFactors
from peft_kernel_lowrank.forwards import LowRankForwards
from peft_kernel_lycoris.layer import SUPPORTED_BASE_LAYERS, LycorisLayer, conv_core_shape, kaiming_uniform, tucker

FACTORED: str = "cheaper"
"""When a Linear LoHa adapter runs as its rank-``r**2`` factors: ``"cheaper"`` (their FLOPs per
token, ``r**2 * (in + out)``, are below the dense delta's ``in * out``), ``"always"`` or ``"never"``."""


def factored_is_cheaper(r: int, in_features: int, out_features: int) -> bool:
    """Whether ``x -> x V^T U^T`` at rank ``r**2`` costs fewer FLOPs per token than ``x -> x dW^T``."""
    return r * r * (in_features + out_features) < in_features * out_features


def face_split(w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(V [r1*r2, in], U [out, r1*r2])`` with ``U @ V == (w1_a @ w1_b) * (w2_a @ w2_b)``."""
    u = (w1_a[:, :, None] * w2_a[:, None, :]).reshape(w1_a.shape[0], -1)
    v = (w1_b[:, None, :] * w2_b[None, :, :]).reshape(-1, w1_b.shape[1])
    return v, u


class LoHaLayer(LowRankForwards, LycorisLayer):
    """LoHa on a Linear / Conv1d / Conv2d base layer."""

    round_delta_to_base = False  # HF PEFT adds LoHa's float32 delta to a half-precision base, then rounds

    adapter_layer_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.hada_w1_a = nn.ParameterDict()
        self.hada_w1_b = nn.ParameterDict()
        self.hada_w2_a = nn.ParameterDict()
        self.hada_w2_b = nn.ParameterDict()
        self.hada_t1 = nn.ParameterDict()
        self.hada_t2 = nn.ParameterDict()
        self._factored = DerivedFactors()

    def create_adapter(self, adapter_name: str, r: int, config: LoHaConfig) -> None:
        out_dim, in_dim, kernel = self.out_features, self.in_features, self.kernel_size
        if self.is_conv and config.use_effective_conv2d and any(k != 1 for k in kernel):
            core = conv_core_shape(r, kernel)
            self.hada_t1[adapter_name] = nn.Parameter(torch.empty(core))
            self.hada_t2[adapter_name] = nn.Parameter(torch.empty(core))
            shapes = {"a": (r, out_dim), "b": (r, in_dim)}
        else:
            flat_in = in_dim * int(torch.Size(kernel).numel())
            shapes = {"a": (out_dim, r), "b": (r, flat_in)}
        self.hada_w1_a[adapter_name] = nn.Parameter(torch.empty(shapes["a"]))
        self.hada_w1_b[adapter_name] = nn.Parameter(torch.empty(shapes["b"]))
        self.hada_w2_a[adapter_name] = nn.Parameter(torch.empty(shapes["a"]))
        self.hada_w2_b[adapter_name] = nn.Parameter(torch.empty(shapes["b"]))

    def rescales_rank_dropout(self, config: LoHaConfig) -> bool:
        """LoHa has no ``rank_dropout_scale`` field: HF PEFT always divides its rank-dropout mask by
        the mask's mean (LyCORIS's behaviour), so this does too."""
        return True

    def reset_adapter(self, adapter_name: str, init_weights: bool) -> None:
        """Kaiming-uniform everywhere; with ``init_weights=True`` ``hada_w2_b`` starts at zero, so
        the adapter starts as the identity (HF's choice)."""
        with torch.no_grad():
            for p in self.adapter_parameters(adapter_name):
                kaiming_uniform(p)
            if init_weights:
                nn.init.zeros_(self.hada_w2_b[adapter_name])

    def _factor(self, adapter_name: str, index: int) -> torch.Tensor:
        w_a = getattr(self, f"hada_w{index}_a")[adapter_name]
        w_b = getattr(self, f"hada_w{index}_b")[adapter_name]
        core = self._param(f"hada_t{index}", adapter_name)
        if core is not None:
            return tucker(core, w_a, w_b)
        return w_a @ w_b

    def raw_delta_weight(self, adapter_name: str) -> torch.Tensor:
        product = self._factor(adapter_name, 1) * self._factor(adapter_name, 2)
        return product.reshape(self.base_layer.weight.shape)

    def low_rank_factors(self, adapter_name: str) -> LowRankFactors | None:
        """``(V, U, alpha / r)`` (see the module) for a Linear adapter where :data:`FACTORED` allows;
        ``None`` on convs, in training with rank or module dropout, or where the dense delta is cheaper."""
        if self.is_conv or adapter_name not in self.hada_w1_a or FACTORED == "never":
            return None
        if self.training and (self.rank_dropout[adapter_name] or self.module_dropout[adapter_name]):
            return None
        r = self.r[adapter_name]
        if FACTORED == "cheaper" and not factored_is_cheaper(r, self.in_features, self.out_features):
            return None
        sources = tuple(getattr(self, f"hada_w{i}_{ab}")[adapter_name] for i in (1, 2) for ab in "ab")
        w1_a, w1_b, w2_a, w2_b = sources
        v, u = self._factored.get(adapter_name, sources, lambda: face_split(w1_a, w1_b, w2_a, w2_b))
        return v, u, self.scaling[adapter_name]

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._factored.drop(adapter_name)


def make_layer(config: LoHaConfig, adapter_name: str, base_layer: nn.Module, module_name: str) -> LoHaLayer | None:
    """The LoHa layer for ``base_layer`` with ``adapter_name`` added, or None for unsupported types."""
    if not isinstance(base_layer, SUPPORTED_BASE_LAYERS):
        return None
    layer = LoHaLayer(base_layer)
    layer.update_layer(adapter_name, config, module_name)
    return layer
