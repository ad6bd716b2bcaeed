"""Frozen random projections shared by every layer of an adapter: VeRA's ``vera_A`` / ``vera_B``,
RandLora's ``randlora_A`` / ``randlora_B``.

One pair per adapter, drawn from ``projection_prng_key`` and sized for the largest targeted layer;
each layer uses the leading slice that fits its own shape (:func:`leading`). The layer base class
:class:`ProjectionLayer` folds a method's trainable vectors into the sliced projections, giving
the ``LowRankLayer`` factors that the stacked kernels of :mod:`peft_kernel_lowrank.mixed` serve,
and derives forward, mixed batches and merging from them. Imported on first use (torch).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from peft_kernel.plugin_api import (
    AdapterLayer,
    ConfigError,
    LowRankFactors,
    UnsupportedFeatureError,
    base_of,
    walk_modules,
)
from peft_kernel_lowrank import mixed
from peft_kernel_lowrank.derived import DerivedFactors
from peft_kernel_lowrank.forwards import LowRankForwards
from peft_kernel_lowrank.shared_mixed import Rows, drop_state, shared_mixed_forward


# ---- generation -------------------------------------------------------------------------------
def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """``(out_features, in_features)`` of a linear layer (``nn.Linear``, or transformers' ``Conv1D``,
    whose weight is stored ``[in, out]``) or of the one an adapter layer wraps; ``None`` for others."""
    base = base_of(module)
    if isinstance(base, nn.Linear):
        return tuple(base.weight.shape)
    if type(base).__name__ == "Conv1D":
        in_features, out_features = base.weight.shape
        return out_features, in_features
    return None


def largest_features(targets: Iterable[tuple[str, nn.Module]], method: str) -> tuple[int, int]:
    """The largest ``(out_features, in_features)`` over the targeted linear layers (the method's
    layer factory refuses the others by name); an error naming the modules when none is linear."""
    targets = list(targets)
    shapes = [shape for _, module in targets if (shape := linear_features(module)) is not None]
    if not shapes:
        found = ", ".join(f"{name!r} ({type(base_of(module)).__name__})" for name, module in targets[:4])
        raise UnsupportedFeatureError(
            f"{method} adapts linear layers only (nn.Linear, transformers' Conv1D), but target_modules matched "
            f"none: {found}{' ...' if len(targets) > 4 else ''}. Point target_modules at linear layers."
        )
    return max(s[0] for s in shapes), max(s[1] for s in shapes)


def seeded_generator(key: int) -> torch.Generator:
    """The CPU generator every projection of an adapter is drawn from, in order (HF PEFT's)."""
    return torch.Generator(device="cpu").manual_seed(key)


def kaiming_uniform(shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """A float32 tensor of ``shape`` drawn by ``kaiming_uniform_`` (``a=0``, fan in) from
    ``generator``: bit-identical to HF PEFT's projections for the same draws in the same order."""
    tensor = torch.empty(tuple(shape))
    nn.init.kaiming_uniform_(tensor, generator=generator)
    return tensor


def unit_std(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor / tensor.std()`` in the tensor's own dtype, then float32 (HF PEFT's RandLora bases)."""
    return (tensor / tensor.std()).float()


def ternary(shape: Sequence[int], p: float, generator: torch.Generator) -> torch.Tensor:
    """A float32 tensor of -1 (probability ``p``), +1 (probability ``p``) and 0, from ``torch.rand``
    draws of ``generator`` (HF PEFT's sparse RandLora bases, before normalisation)."""
    u = torch.rand(tuple(shape), generator=generator)
    return (u > 1 - p).float() - (u < p).float()


def without_keys(state_dict: dict[str, torch.Tensor], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``state_dict`` less every key whose last component is one of ``names`` (projections left out
    of a checkpoint with ``save_projection=False``)."""
    return {k: v for k, v in state_dict.items() if k.rpartition(".")[2] not in names}


def leading(tensor: torch.Tensor, sizes: Sequence[int | None], name: str, module_name: str = "") -> torch.Tensor:
    """The leading ``sizes`` slice of a shared projection (``None``: the whole dimension), or a
    :class:`ConfigError` naming the projection when it is too small for the layer (a saved
    projection sized for other layers, or an adapter added with another rank)."""
    if any(s is not None and s > n for s, n in zip(sizes, tensor.shape)):
        needed = tuple(n if s is None else s for s, n in zip(sizes, tensor.shape))
        where = f" for {module_name!r}" if module_name else ""
        raise ConfigError(
            f"the shared projection {name} has shape {tuple(tensor.shape)}, too small{where}, which needs at "
            f"least {needed}: it was made (or saved) for smaller layers or another r; build the adapter with the "
            "same r and target_modules it was made for."
        )
    return tensor[tuple(slice(None) if s is None else slice(0, s) for s in sizes)]


# ---- one set of projection settings per model ---------------------------------------------------
def check_same_settings(model: nn.Module, layer_type: type, config: Any, fields: Sequence[str]) -> None:
    """Refuse ``config`` when an adapter of ``layer_type`` already in ``model`` was made with other
    values of ``fields`` (HF PEFT's rule for VeRA / RandLora: all adapters of a model share one
    projection seed, rank and saving choice), naming the field and both values."""
    owner = type(config).__name__
    for _, layer in walk_modules(model):
        if not isinstance(layer, layer_type):
            continue
        for adapter, settings in layer.projection_settings.items():
            for field in fields:
                theirs, ours = settings[field], getattr(config, field)
                if theirs != ours:
                    raise ConfigError(
                        f"{owner}.{field} must be the same for every adapter of this method in one model (their "
                        f"layers share one set of random projections): adapter {adapter!r} has {field}={theirs!r}, "
                        f"the new adapter {field}={ours!r}."
                    )


HALF = (torch.float16, torch.bfloat16)


# ---- the layer --------------------------------------------------------------------------------
class ProjectionLayer(LowRankForwards, AdapterLayer):
    """Base of adapter layers whose update is ``B' @ A'`` built from shared frozen projections and
    the layer's trainable tensors, on ``nn.Linear`` or transformers' ``Conv1D`` (``fan_in_fan_out``).

    A subclass names its dropout container in ``dropout_name`` and implements :meth:`fold_inputs`
    (the adapter's tensors the factors are made from), :meth:`fold` (``(A' [k, in], B' [out, k])``
    from them) and, where a scalar follows the product, :meth:`scale`; for mixed batches that run
    the shared projections once for every row (:mod:`peft_kernel_lowrank.shared_mixed`),
    :meth:`shared_projections`, :meth:`shared_vectors` and :meth:`shared_mixed_add`. Per adapter,
    ``projection_settings`` records the config fields every adapter of the model must share
    (:func:`check_same_settings`)."""

    dropout_name: str = ""
    shared_max_tokens: int = 2**62
    """Mixed batches of at most this many tokens share the projections
    (:mod:`peft_kernel_lowrank.shared_mixed`); a method lowers it where its other paths measured faster."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        features = linear_features(base_layer)
        if features is None:
            raise TypeError(f"{type(self).__name__} wraps nn.Linear or Conv1D, got {type(base_layer).__name__}")
        self.out_features, self.in_features = features
        self.projection_settings: dict[str, dict[str, Any]] = {}
        self._folded = DerivedFactors()

    # ---- what a method supplies ---------------------------------------------------------------
    def fold_inputs(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        """The live tensors :meth:`fold` reads (trainable vectors and shared projections)."""
        raise NotImplementedError

    def fold(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A' [k, in], B' [out, k])`` with ``delta(x) = scale * (x @ A'.T) @ B'.T``."""
        raise NotImplementedError

    def scale(self, adapter_name: str) -> float:
        """The scalar applied after the factors (1.0 unless the method has one)."""
        return 1.0

    def shared_projections(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        """The layer's slices of the adapter's shared projections, as :meth:`shared_mixed_add` takes them."""
        raise NotImplementedError

    def shared_vectors(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        """The adapter's own tensors as :meth:`shared_mixed_add` takes them stacked (zeros: no update)."""
        raise NotImplementedError

    def shared_mixed_add(self, result: torch.Tensor, x: torch.Tensor, projections: tuple[torch.Tensor, ...],
                         stacks: tuple[torch.Tensor, ...], rows: Rows) -> torch.Tensor:
        """``result [tokens, out]`` plus each token's update for ``x [tokens, in]``: ``projections``
        once for all tokens, ``stacks`` (:meth:`shared_vectors` per slot) gathered per token."""
        raise NotImplementedError

    def adapter_dtype(self) -> torch.dtype:
        """The dtype new trainable tensors get: the base weight's when it is a float, else float32."""
        weight = base_of(self).weight
        return weight.dtype if weight.is_floating_point() else torch.float32

    # ---- bookkeeping ---------------------------------------------------------------------------
    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.projection_settings.pop(adapter_name, None)
        self._folded.drop(adapter_name)
        mixed.drop_stack(self)
        drop_state(self)

    def _dropout(self, adapter_name: str) -> nn.Module:
        return getattr(self, self.dropout_name)[adapter_name]

    # ---- the update ---------------------------------------------------------------------------
    def folded(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`fold`, cached without autograd until one of its inputs changes, so the same
        tensor objects come back (the stacked kernels' freshness check relies on it)."""
        # DerivedFactors: normal tensors even under inference_mode (the stacks check their _version)
        return self._folded.get(adapter_name, tuple(self.fold_inputs(adapter_name)), lambda: self.fold(adapter_name))

    def delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        a, b = self.folded(adapter_name)
        x = self._dropout(adapter_name)(x.to(a.dtype))
        return F.linear(F.linear(x, a), b) * self.scale(adapter_name)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = self.folded(adapter_name)
        weight = (b @ a) * self.scale(adapter_name)
        return weight.T if self.fan_in_fan_out else weight

    def shared_sources(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        """The adapter's shared projection buffers (``shared_tensor_names``)."""
        return tuple(getattr(self, name)[adapter_name] for name in self.shared_tensor_names)

    def shared_ready(self, adapter_name: str) -> bool:
        """Whether ``adapter_name`` may take the shared mixed path in training: no live dropout."""
        return isinstance(self._dropout(adapter_name), nn.Identity)

    def mixed_forward(self, x: torch.Tensor, routing: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The shared projections once for every row where the batch's adapters share them
        (:mod:`peft_kernel_lowrank.shared_mixed`); otherwise the dense, stacked or grouped paths."""
        result = shared_mixed_forward(self, x, routing, *args, **kwargs)
        return super().mixed_forward(x, routing, *args, **kwargs) if result is None else result

    def low_rank_factors(self, adapter_name: str) -> LowRankFactors | None:
        """``(A', B', scale)``; ``None`` for adapters this layer does not hold and for live dropout
        in training (the generic path applies it)."""
        if adapter_name not in self.projection_settings:
            return None
        if self.training and not isinstance(self._dropout(adapter_name), nn.Identity):
            return None
        a, b = self.folded(adapter_name)
        return a, b, self.scale(adapter_name)

    def adapted_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus each adapter in turn: the fused kernel in place for full-precision
        adapters on a base of their dtype; otherwise :meth:`delta` added in the wider of the two
        dtypes and rounded once at the end, as HF PEFT does (float32 adapters on a half-precision
        base give HF's output bit for bit)."""
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        for name in adapters:
            factors = self.low_rank_factors(name)
            if factors is not None and factors[1].dtype == result.dtype and result.dtype not in HALF:
                result = mixed.add_single(self, result, x, name, factors)
            else:
                result = result + self.delta(x, name)
        return result.to(dtype)
