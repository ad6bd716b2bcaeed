"""``LoraLSTM``: low-rank updates of an LSTM's weight matrices.

For every weight matrix ``W`` of the LSTM (``weight_ih_l0`` [4h, in], ``weight_hh_l0`` [4h, h], ...)
adapter ``a`` holds ``A`` [r, in] and ``B`` [out, r]; the LSTM runs with ``W + scaling * B @ A``
through ``torch.func.functional_call``, so torch's fused LSTM kernel still does the work.

An LSTM's output is not ``base(x) + delta(x)``, so this layer takes the non-additive route of the
layer protocol: it overrides ``adapted_forward``, ``mixed_forward``, ``merge_into_base`` and
``unmerge_from_base``. Storage stays in the standard containers (``lora_A`` / ``lora_B``, one
``nn.ParameterDict`` per adapter keyed by weight name), so saving, loading, deleting and training
come from the core: in memory ``lstm.lora_A.default.weight_ih_l0``, on disk ``lstm.lora_A.weight_ih_l0``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence

from peft_kernel.errors import MixedBatchError
from peft_kernel.layer import AdapterLayer
from peft_kernel.routing import Routing
from peft_kernel.targeting import pattern_value


class LoraLSTM(AdapterLayer):
    """LoRA on every ``weight_*`` matrix of an ``nn.LSTM`` (biases stay frozen)."""

    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = ("r", "lora_alpha", "scaling")

    def __init__(self, base_layer: nn.LSTM) -> None:
        super().__init__(base_layer)
        self.weight_names = [n for n, _ in base_layer.named_parameters(recurse=False) if n.startswith("weight_")]
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    # ---- creation --------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: Any, module_name: str = "") -> None:
        problems = list(config.unsupported())
        if config.use_dora:
            problems.append("use_dora=True")
        if config.lora_bias:
            problems.append("lora_bias=True")
        if config.lora_dropout:
            problems.append(f"lora_dropout={config.lora_dropout}")
        if config.init_lora_weights not in (True, False, "gaussian"):
            problems.append(f"init_lora_weights={config.init_lora_weights!r}")
        if problems:
            raise NotImplementedError(
                f"LoRA for nn.LSTM (peft-kernel-lora-lstm) does not support {', '.join(problems)} "
                f"(module {module_name!r}); leave these at their defaults or exclude the LSTM."
            )
        r = pattern_value(config.rank_pattern, module_name, config.r)
        alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank for {module_name!r} must be a positive integer, got {r!r}")
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, alpha
        self.scaling[adapter_name] = self._scaling(alpha, r, config.use_rslora)
        lora_a, lora_b = nn.ParameterDict(), nn.ParameterDict()
        for name in self.weight_names:
            weight = getattr(self.base_layer, name)
            dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
            a = torch.empty(r, weight.shape[1], device=weight.device, dtype=dtype)
            b = torch.zeros(weight.shape[0], r, device=weight.device, dtype=dtype)
            if config.init_lora_weights == "gaussian":
                nn.init.normal_(a, std=1 / r)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            if config.init_lora_weights is False:
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))  # not the identity: for tests
            lora_a[name], lora_b[name] = nn.Parameter(a), nn.Parameter(b)
        self.lora_A[adapter_name], self.lora_B[adapter_name] = lora_a, lora_b

    @staticmethod
    def _scaling(alpha: float, r: int, use_rslora: bool) -> float:
        return alpha / math.sqrt(r) if use_rslora else alpha / r

    def hotswap_update(self, adapter_name: str, config: Any, module_name: str = "") -> None:
        alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
        self.lora_alpha[adapter_name] = alpha
        self.scaling[adapter_name] = self._scaling(alpha, self.r[adapter_name], config.use_rslora)

    # ---- weights ----------------------------------------------------------------------------
    def delta_weights(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """``{weight name: scaling * B @ A}`` for one adapter."""
        a, b, scaling = self.lora_A[adapter_name], self.lora_B[adapter_name], self.scaling[adapter_name]
        return {name: (b[name] @ a[name]) * scaling for name in self.weight_names}

    def adapted_weights(self, adapters: list[str]) -> dict[str, torch.Tensor]:
        weights = {name: getattr(self.base_layer, name) for name in self.weight_names}
        for adapter in adapters:
            for name, delta in self.delta_weights(adapter).items():
                weights[name] = weights[name] + delta.to(weights[name].dtype)
        return weights

    # ---- forward ----------------------------------------------------------------------------
    def adapted_forward(self, x: Any, adapters: list[str], *args: Any, **kwargs: Any) -> Any:
        """The LSTM with every active adapter's update added to its weights."""
        return functional_call(self.base_layer, self.adapted_weights(adapters), (x, *args), kwargs)

    def mixed_forward(self, x: Any, routing: Routing, *args: Any, **kwargs: Any) -> Any:
        """Rows grouped by adapter once per forward (``routing.groups``); one LSTM call per group."""
        if isinstance(x, PackedSequence) or x.dim() != 3:
            raise MixedBatchError("LoRA for nn.LSTM serves mixed batches of padded, batched [B, T, F] / [T, B, F] inputs only.")
        batch_dim = 0 if self.base_layer.batch_first else 1
        hx = args[0] if args else kwargs.get("hx")
        outputs, states, order = [], [], []
        for name, rows in routing.groups(x.shape[batch_dim], x.device).items():
            rows_x = x.index_select(batch_dim, rows)
            rows_hx = None if hx is None else tuple(h.index_select(1, rows) for h in hx)
            adapters = [name] if self.has_adapter(name) else []  # "__base__" and unknown names: base LSTM
            out, (h, c) = self.adapted_forward(rows_x, adapters, rows_hx)
            outputs.append(out)
            states.append((h, c))
            order.append(rows)
        inverse = torch.argsort(torch.cat(order))
        output = torch.cat(outputs, batch_dim).index_select(batch_dim, inverse)
        h_n = torch.cat([s[0] for s in states], 1).index_select(1, inverse)
        c_n = torch.cat([s[1] for s in states], 1).index_select(1, inverse)
        return output, (h_n, c_n)

    # ---- merge ------------------------------------------------------------------------------
    def merge_into_base(self, adapter_name: str, safe_merge: bool = False) -> None:
        deltas = self.delta_weights(adapter_name)
        merged = {name: getattr(self.base_layer, name).detach() + d.detach() for name, d in deltas.items()}
        if safe_merge and not all(torch.isfinite(w).all() for w in merged.values()):
            raise ValueError(
                f"NaNs or infs detected while merging adapter {adapter_name!r} into {type(self).__name__}; "
                "the base weights were left untouched."
            )
        with torch.no_grad():
            for name, weight in merged.items():
                getattr(self.base_layer, name).copy_(weight)

    def unmerge_from_base(self, adapter_name: str) -> None:
        with torch.no_grad():
            for name, delta in self.delta_weights(adapter_name).items():
                getattr(self.base_layer, name).sub_(delta.to(getattr(self.base_layer, name).dtype))
