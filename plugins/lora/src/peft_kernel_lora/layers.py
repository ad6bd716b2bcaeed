"""LoRA adapter layers: ``nn.Linear`` (and transformers ``Conv1D``), ``nn.Embedding``, ``nn.Conv1d/2d/3d``.

Each adapter adds ``scaling * B(A(dropout(x)))`` to the base output; with DoRA the weight is
re-normalised per output channel by a learned magnitude (see :mod:`peft_kernel_lora.dora`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peft_kernel.plugin_api import AdapterLayer, BufferDict, LowRankFactors, UnsupportedFeatureError, linear_fan_in_fan_out, pattern_value
from peft_kernel_lora import alora, arrow, dora, init, monteclora, replication, tokens, variants, velora
from peft_kernel_lora.config import LoraConfig
from peft_kernel_lowrank import compiled, mixed, single
from peft_kernel_lowrank.derived import DerivedFactors


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters train in float32 when the base is half precision (HF's autocast_adapter_dtype)."""
    dtype = weight.dtype
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class LoraLayer(AdapterLayer):
    """State and bookkeeping shared by every LoRA layer type."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                           "lora_diag", "lora_velora_embed", "lora_monteclora_sampler")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_dora", "alora_invocation_tokens",
                         "lora_arrow", "lora_velora")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.alora_invocation_tokens: dict[str, tuple[int, ...]] = {}  # aLoRA adapters (see alora)
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.lora_diag = nn.ParameterDict()  # KaSA's singular values (see kasa)
        self.derived_factor_adapters: set[str] = set()  # KaSA / BD-LoRA adapters (see variants)
        self.derived_factors = DerivedFactors()
        self.tied_adapters: set[str] = set()  # tensors shared with a tied embedding's (see weight_tying)
        self.lora_arrow = nn.ModuleDict()  # Arrow routers (see arrow)
        self.lora_velora: dict[str, velora.VeloraState] = {}  # VeLoRA adapters (see velora)
        self.lora_velora_embed = BufferDict()
        self.lora_monteclora_sampler = nn.ModuleDict()  # MonteCLoRA adapters (see monteclora)
        self._dora_factor: dict[str, torch.Tensor] = {}
        self._unmerged_weight: torch.Tensor | None = None  # set while a DoRA merge needs the bare base weight

    def has_adapter(self, adapter_name: str) -> bool:
        # every LoRA adapter has a rank: one dict lookup instead of a scan of the containers (hot path)
        return adapter_name in self.r

    def adapter_names(self) -> list[str]:
        return list(self.r)  # as has_adapter: read once per mixed-batch forward by the stacks

    def delete_adapter(self, adapter_name: str) -> None:
        arrow.forget(self, adapter_name)
        dora.forget(self, adapter_name)
        super().delete_adapter(adapter_name)
        variants.drop(self, adapter_name)
        self.tied_adapters.discard(adapter_name)
        mixed.drop_stack(self)

    # ---- creation --------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: LoraConfig, module_name: str = "",
                     shared: dict[str, torch.Tensor] | None = None) -> None:
        """``shared``: the adapter's token rows for ``trainable_token_indices`` modules, not this layer's."""
        unsupported = config.unsupported()
        if unsupported:
            raise UnsupportedFeatureError(
                f"peft-kernel-lora does not implement {', '.join(unsupported)} yet (module {module_name!r}); "
                "leave these at their defaults."
            )
        if config.arrow_config is not None and not isinstance(self, Linear):
            return  # HF PEFT adds Arrow routers to linear layers only
        r = pattern_value(config.rank_pattern, module_name, config.r)
        alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank for {module_name!r} must be a positive integer, got {r!r}")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = alpha
        self.scaling[adapter_name] = self._scaling(alpha, r, config.use_rslora)
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.use_dora[adapter_name] = config.use_dora
        invocation = alora.check_layer(self, config, module_name, isinstance(self, Linear))
        if invocation is not None:
            self.alora_invocation_tokens[adapter_name] = invocation
        self.create_adapter(adapter_name, r, config)
        variants.create(self, adapter_name, r, config, module_name)
        weight = self.adapted_tensor()
        for p in self.adapter_parameters(adapter_name):
            p.data = p.data.to(device=weight.device, dtype=_adapter_dtype(weight))
        init.initialize(self, adapter_name, config.init_lora_weights, config.loftq_config, config.lora_ga_config)
        variants.after_init(self, adapter_name)
        if config.velora_config is not None:
            velora.add(self, adapter_name, config.velora_config)
        if config.monteclora_config is not None:
            monteclora.add(self, adapter_name, config.monteclora_config)
        if config.use_dora:
            self.lora_magnitude_vector[adapter_name] = nn.Parameter(dora.initial_magnitude(self, adapter_name))
        arrow.update(self, adapter_name, config, routes=isinstance(self, Linear))

    @staticmethod
    def _scaling(alpha: float, r: int, use_rslora: bool) -> float:
        return alpha / math.sqrt(r) if use_rslora else alpha / r

    def hotswap_update(self, adapter_name: str, config: Any, module_name: str = "") -> None:
        alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
        self.lora_alpha[adapter_name] = alpha
        r = pattern_value(config.rank_pattern, module_name, config.r)  # a lower rank, zero-padded (prepared)
        self.scaling[adapter_name] = self._scaling(alpha, r, config.use_rslora)
        alora.hotswap(self, adapter_name, config, module_name, isinstance(self, Linear))

    def create_adapter(self, adapter_name: str, r: int, config: LoraConfig) -> None:
        raise NotImplementedError

    # ---- the low-rank product ---------------------------------------------------------------
    def lora_weight(self, adapter_name: str) -> torch.Tensor:
        """``B @ A`` in the base weight's [out, in, ...] orientation (unscaled)."""
        raise NotImplementedError

    def base_weight(self) -> torch.Tensor:
        """The base weight as [out, in, ...] (Conv1D's [in, out] transposed)."""
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    def to_base_layout(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.fan_in_fan_out else weight

    def lora_product(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``scaling * B(A(x))`` for ``x`` already dropped out and in the adapter dtype."""
        raise NotImplementedError

    def low_rank_factors(self, adapter_name: str) -> LowRankFactors | None:
        """The core's ``LowRankLayer`` protocol: ``None`` here (embedding lookups and convolutions
        are not feature maps); :class:`Linear` gives ``(lora_A.weight, lora_B.weight, scaling)``."""
        return None

    def base_output_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer applied to ``x`` without its bias (DoRA rescales this part)."""
        raise NotImplementedError

    def without_bias(self, result: torch.Tensor) -> torch.Tensor:
        """The layer's output ``result`` minus the base layer's bias (what DoRA rescales)."""
        bias = getattr(self.base_layer, "bias", None)
        return result if bias is None else result - bias.to(result.dtype)

    def delta(self, x: torch.Tensor, adapter_name: str, result: torch.Tensor | None = None,
              rows: torch.Tensor | None = None) -> torch.Tensor:
        """``adapter_name``'s addition to the output. ``result`` (optional) is the output so far;
        DoRA rescales it as HF PEFT does when several adapters are active (see ``dora``). An aLoRA
        adapter's delta is masked to its rows' tokens from the invocation on (``rows``: the batch
        rows ``x`` holds, in a mixed batch)."""
        if x.is_floating_point():
            dropout = self.lora_dropout[adapter_name]
            if result is not None and self.training and not isinstance(dropout, nn.Identity):
                result = None  # live dropout: DoRA rescales W·dropout(x), not the output so far (HF)
            x = dropout(x.to(next(iter(self.adapter_parameters(adapter_name))).dtype))
        if adapter_name in self.lora_arrow:
            return arrow.delta(self, x, adapter_name)
        if self.use_dora[adapter_name]:
            return dora.delta(self, x, adapter_name, None if result is None else self.without_bias(result))
        invocation = self.alora_invocation_tokens.get(adapter_name)
        if invocation is not None:
            return alora.mask(self.lora_product(x, adapter_name), invocation, rows)
        if velora.active(self, adapter_name):
            return velora.product(self, x, adapter_name)
        if monteclora.training(self, adapter_name):
            monteclora.refuse_training(adapter_name)
        return self.lora_product(x, adapter_name)

    def adapted_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus each adapter in turn; a DoRA adapter sees the output so far."""
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        for name in adapters:  # float32 adapters on a half-precision base: summed in float32, rounded once (HF)
            result = result + self.delta(x, name, result)
        return result.to(dtype)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        if self.use_dora[adapter_name]:
            return dora.merged_weight(self, adapter_name, self._dora_factor.get(adapter_name)) - self.base_layer.weight
        return self.to_base_layout(self.lora_weight(adapter_name) * self.scaling[adapter_name])

    def unmerged_base_weight(self) -> torch.Tensor:
        """The base weight ([out, in, ...]) without the adapters merged into it, the one DoRA's norm
        is taken on (as in the forward). Merged adapters are taken out and put back through the
        merge hook, so a plugin that merges into quantized or sharded weights is respected."""
        if self._unmerged_weight is not None:
            return self._unmerged_weight
        merged = list(self.merged_adapters)
        if not merged:
            return self.base_weight().detach()
        self.unmerge()
        self._unmerged_weight = self.base_weight().detach().clone()
        try:
            self.merge(adapter_names=merged)  # DoRA adapters among them reuse the weight just taken
            return self._unmerged_weight
        finally:
            self._unmerged_weight = None

    def merge_into_base(self, adapter_name: str, safe_merge: bool = False) -> None:
        replication.check_merge(self, adapter_name)
        if adapter_name in self.tied_adapters:
            return  # the tied embedding folds the shared delta into the shared weight
        if adapter_name in self.alora_invocation_tokens:
            alora.refuse_merge(adapter_name)
        if adapter_name in self.lora_arrow:
            arrow.refuse_merge(adapter_name)
        if not self.use_dora[adapter_name]:
            return super().merge_into_base(adapter_name, safe_merge)
        self._dora_factor[adapter_name] = dora.factor(self, adapter_name, self.unmerged_base_weight()).detach()
        try:
            super().merge_into_base(adapter_name, safe_merge)
        except BaseException:
            self._dora_factor.pop(adapter_name, None)
            raise

    def unmerge_from_base(self, adapter_name: str) -> None:
        if adapter_name in self.tied_adapters:
            return
        if not self.use_dora[adapter_name]:
            return super().unmerge_from_base(adapter_name)
        with torch.no_grad():
            dora.unmerge(self, adapter_name, self._dora_factor.pop(adapter_name))


class Linear(LoraLayer):
    """LoRA for ``nn.Linear`` and transformers' ``Conv1D`` (``fan_in_fan_out``)."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, fan_in_fan_out)
        out_features, in_features = self.base_weight().shape
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not args and not kwargs:  # inference with the active adapters: see peft_kernel_lowrank.single
            out = single.inference_forward(self, x)
            if out is not None:
                return out
        return super().forward(x, *args, **kwargs)

    def create_adapter(self, adapter_name: str, r: int, config: LoraConfig) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=config.lora_bias)

    def lora_weight(self, adapter_name: str) -> torch.Tensor:
        if adapter_name in self.derived_factor_adapters:
            a, b = variants.dense_factors(self, adapter_name)
            return b @ a
        return self.lora_B[adapter_name].weight @ self.lora_A[adapter_name].weight

    def lora_product(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        after_a = self.lora_A[adapter_name](x)
        if adapter_name in self.lora_diag:  # KaSA
            after_a = after_a * self.lora_diag[adapter_name]
        return self.lora_B[adapter_name](after_a) * self.scaling[adapter_name]

    def base_output_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.base_weight().to(x.dtype))

    def delta_bias(self, adapter_name: str) -> torch.Tensor | None:
        bias = self.lora_B[adapter_name].bias
        return None if bias is None else bias * self.scaling[adapter_name]

    # ---- the low-rank protocol and the fast forwards (see peft_kernel_lowrank.mixed) ----------
    def low_rank_factors(self, adapter_name: str) -> LowRankFactors | None:
        """``(lora_A.weight [r, in], lora_B.weight [out, r], scaling)``; ``None`` for DoRA, for
        live dropout in training, and for adapters this layer does not hold."""
        if self.lora_velora and velora.active(self, adapter_name):  # VeLoRA's own backward
            return None
        if self.training and adapter_name in self.lora_monteclora_sampler:  # refused in delta
            return None
        modules = self._modules  # read for every adapter on every mixed-batch forward: no Module.__getattr__
        if self.use_dora.get(adapter_name, True) or adapter_name in self.alora_invocation_tokens \
                or adapter_name in modules["lora_arrow"]._modules:  # DoRA, aLoRA, Arrow router, not held
            return None
        if self.training and not isinstance(modules["lora_dropout"]._modules[adapter_name], nn.Identity):
            return None
        lin_a = modules["lora_A"]._modules.get(adapter_name)
        if lin_a is None:  # an adapter whose creation failed half-way holds a rank but no tensors
            return None
        if adapter_name in self.derived_factor_adapters:
            return (*variants.dense_factors(self, adapter_name), self.scaling[adapter_name])
        lin_b = modules["lora_B"]._modules[adapter_name]
        return lin_a._parameters["weight"], lin_b._parameters["weight"], self.scaling[adapter_name]

    def low_rank_parts(self, names: tuple[str, ...]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]]:
        """``{name: (A, B, scale, bias)}`` for the adapters among ``names`` whose
        ``low_rank_factors`` are not ``None``: what ``peft_kernel_lowrank.mixed`` stacks, with the
        layer-wide checks done once (this runs on every mixed-batch forward, for every adapter)."""
        if self.lora_velora or self.training or self.derived_factor_adapters:
            return {n: (*f, self.low_rank_bias(n)) for n in names if (f := self.low_rank_factors(n)) is not None}
        modules = self._modules
        a_modules, b_modules, routers = modules["lora_A"]._modules, modules["lora_B"]._modules, modules["lora_arrow"]._modules
        use_dora, invocations, scaling = self.use_dora, self.alora_invocation_tokens, self.scaling
        out = {}
        for n in names:
            lin_a = a_modules.get(n)
            if lin_a is None or use_dora.get(n, True) or n in invocations or n in routers:
                continue
            b_params = b_modules[n]._parameters
            out[n] = (lin_a._parameters["weight"], b_params["weight"], scaling[n], b_params["bias"])
        return out

    def low_rank_bias(self, adapter_name: str) -> torch.Tensor | None:
        """``lora_B``'s bias (``lora_bias=True``), added as ``scaling * bias``."""
        return self._modules["lora_B"]._modules[adapter_name]._parameters["bias"]

    def adapted_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        if not x.is_floating_point():
            return super().adapted_forward(x, adapters, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs) if args or kwargs else mixed.base_output(self.base_layer, x)
        dtype = result.dtype
        for name in adapters:
            factors = self.low_rank_factors(name)
            if factors is None:
                result = result + self.delta(x, name, result)
            else:
                result = mixed.add_single(self, result, x, name, factors)
        return result if result.dtype == dtype else result.to(dtype)

    def mixed_forward(self, x: torch.Tensor, routing: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.alora_invocation_tokens and any(n in self.alora_invocation_tokens for n in routing.unique):
            return alora.mixed_forward(self, x, routing, *args, **kwargs)
        result = mixed.mixed_forward(self, x, routing, *args, **kwargs)
        if result is None:
            return super().mixed_forward(x, routing, *args, **kwargs)
        return result

    def pad_rank(self, adapter_name: str, target_rank: int) -> bool:
        """Zero-pad ``lora_A`` / ``lora_B`` to ``target_rank`` (``prepare_model_for_compiled_hotswap``);
        ``r`` and ``scaling`` keep the adapter's own values, as in HF PEFT."""
        lin_a, lin_b = self.lora_A[adapter_name], self.lora_B[adapter_name]
        rank = lin_a.weight.shape[0]
        if rank > target_rank:
            raise ValueError(f"Trying to pad the adapter to the target rank {target_rank}, but the original rank is "
                             f"larger ({rank}). This is not possible.")
        if rank < target_rank:
            with torch.no_grad():
                a = lin_a.weight.new_zeros(target_rank, lin_a.weight.shape[1])
                b = lin_b.weight.new_zeros(lin_b.weight.shape[0], target_rank)
                a[:rank] = lin_a.weight
                b[:, :rank] = lin_b.weight
            lin_a.weight = nn.Parameter(a, requires_grad=lin_a.weight.requires_grad)
            lin_b.weight = nn.Parameter(b, requires_grad=lin_b.weight.requires_grad)
            lin_a.out_features = lin_b.in_features = target_rank
        mixed.drop_stack(self)
        return True

    def prepare_compiled(self, order: tuple[str, ...]) -> bool:
        return compiled.prepare(self, order)  # torch.compile: see peft_kernel_lowrank.compiled

    def compiled_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        return compiled.forward(self, x, *args, **kwargs)


class Embedding(LoraLayer):
    """LoRA for ``nn.Embedding``: ``lora_embedding_A`` [r, vocab], ``lora_embedding_B`` [dim, r]."""

    def create_adapter(self, adapter_name: str, r: int, config: LoraConfig) -> None:
        if config.lora_bias:
            raise ValueError("lora_bias=True is not supported for nn.Embedding layers")
        vocab, dim = self.base_layer.weight.shape
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.randn(r, vocab))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.randn(dim, r))

    def _embed(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)

    def lora_weight(self, adapter_name: str) -> torch.Tensor:
        # [dim, vocab]: the embedding table is [vocab, dim], so its "out" axis is the embedding dim
        return self.lora_embedding_B[adapter_name] @ self.lora_embedding_A[adapter_name]

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight.T

    def to_base_layout(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T

    def lora_product(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        after_a = self._embed(x, self.lora_embedding_A[adapter_name].T)
        out = (after_a @ self.lora_embedding_B[adapter_name].T) * self.scaling[adapter_name]
        embed_scale = getattr(self.base_layer, "embed_scale", None)  # scaled embeddings (Gemma...)
        return out if embed_scale is None else out * embed_scale.to(out.dtype)

    def base_output_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)


class ConvNd(LoraLayer):
    """LoRA for ``nn.Conv1d/2d/3d``: ``lora_A`` has the base kernel, ``lora_B`` is 1x1.

    Grouped convolutions (``groups > 1``), as HF PEFT: ``lora_A`` is an ungrouped conv, ``lora_B``
    has the base layer's groups, so the rank must be divisible by ``groups``. The product then
    connects every input channel to every output, which a grouped base weight cannot hold: such
    adapters cannot be merged (HF refuses too), and DoRA, whose norm needs ``W + s·BA`` as one
    weight, is refused (HF computes it on ``B @ A`` reshaped to the grouped weight's shape)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.conv_class = type(base_layer)
        self.ndim = base_layer.weight.dim() - 2
        if base_layer.groups > 1:
            warnings.warn("LoRA adapter added to ConvNd layer with groups > 1. Merging is not supported.", UserWarning, stacklevel=2)

    def create_adapter(self, adapter_name: str, r: int, config: LoraConfig) -> None:
        base = self.base_layer
        groups = base.groups
        if r % groups != 0:
            raise ValueError(
                f"Targeting a {type(base).__name__} with groups={groups} and rank {r}. Currently, support is limited "
                "to conv layers where the rank is divisible by groups. Either choose a different rank or do not "
                "target this specific layer."
            )
        if groups > 1 and config.use_dora:
            raise ValueError(
                f"DoRA is not supported for grouped convolutions ({type(base).__name__} with groups={groups}): the "
                "LoRA product of such a layer has no grouped weight to normalise. Use plain LoRA for this layer."
            )
        ones = (1,) * self.ndim
        self.lora_A[adapter_name] = self.conv_class(base.in_channels, r, base.kernel_size, base.stride, base.padding, bias=False)
        self.lora_B[adapter_name] = self.conv_class(r, base.out_channels, ones, ones, groups=groups, bias=config.lora_bias)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        if self.base_layer.groups > 1:
            raise NotImplementedError("Merging is not supported for _ConvNd layers with groups > 1!")
        return super().delta_weight(adapter_name)

    def lora_weight(self, adapter_name: str) -> torch.Tensor:
        b = self.lora_B[adapter_name].weight.flatten(1)
        return torch.tensordot(b, self.lora_A[adapter_name].weight, dims=1)

    def lora_product(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return self.lora_B[adapter_name](self.lora_A[adapter_name](x)) * self.scaling[adapter_name]

    def without_bias(self, result: torch.Tensor) -> torch.Tensor:
        bias = self.base_layer.bias
        return result if bias is None else result - bias.to(result.dtype).view(1, -1, *([1] * self.ndim))

    def base_output_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        conv = getattr(F, f"conv{self.ndim}d")
        return conv(x, base.weight.to(x.dtype), None, base.stride, base.padding, base.dilation, base.groups)

    def delta_bias(self, adapter_name: str) -> torch.Tensor | None:
        bias = self.lora_B[adapter_name].bias
        return None if bias is None else bias * self.scaling[adapter_name]


def make_layer(config: LoraConfig, adapter_name: str, base_layer: nn.Module, module_name: str,
               shared: dict[str, torch.Tensor] | None = None) -> AdapterLayer | None:
    """The LoRA layer for ``base_layer``'s type with ``adapter_name`` added, or None if unsupported;
    for a ``trainable_token_indices`` module, the Trainable Tokens layer holding its rows."""
    if tokens.has_rows_for(module_name, shared):
        return tokens.make_token_layer(adapter_name, base_layer, module_name, shared)
    fan_in_fan_out = linear_fan_in_fan_out(config, base_layer)
    if fan_in_fan_out is not None:
        layer: LoraLayer = Linear(base_layer, fan_in_fan_out=fan_in_fan_out)
    elif config.arrow_config is not None:
        return None  # HF PEFT adds Arrow routers to linear layers only
    elif isinstance(base_layer, nn.Embedding):
        layer = Embedding(base_layer)
    elif isinstance(base_layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        layer = ConvNd(base_layer)
    else:
        return None
    layer.update_layer(adapter_name, config, module_name)
    return layer
