"""OFT adapter layers: ``nn.Linear``, ``nn.Conv2d`` and ``nn.Embedding`` (HF PEFT's layer types).

An OFT adapter multiplies the base weight by a block-diagonal rotation ``R``:

* Linear: ``y = base(x R)`` -- the input features are rotated; merged weight ``W R^T``.
* Conv2d: the rotation acts on the flattened ``in_channels * kh * kw`` patch features, applied to
  the weight: ``W' = W.flatten(1) R^T``, then the base convolution with ``W'``. This is HF PEFT's
  merged weight; HF 0.21.2's *unmerged* Conv2d forward does not compute it (it changes the output
  even for an identity rotation), so here unmerged, merged and HF-merged outputs agree.
* Embedding: the embedding vectors are rotated, ``y = base(x) R``; merged table ``E R``.

Several active adapters apply in order (``x R_a R_b`` for Linear, as HF PEFT); merging folds them
in the matching order so merged and unmerged outputs agree (HF PEFT's merge does not for several
adapters). Mixed batches rotate each adapter's group of rows with its blocks (computed once and
reused across forwards outside training); the base layer still runs once over the whole batch
(Conv2d: one convolution per adapter group).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peft_kernel.plugin_api import Routing
from peft_kernel_oft.config import OFTConfig
from peft_kernel_oft.rotation import OFTRotationModule
from peft_kernel_orthogonal.layer import RotationLayer, adapter_dtype
from peft_kernel_orthogonal.rotation import apply_blocks, block_layout


def _transposed(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.transpose(-1, -2)


class OFTLayer(RotationLayer):
    """State and bookkeeping shared by every OFT layer type (rotations, mixed batches and the
    multiplicative merge come from :class:`~peft_kernel_orthogonal.layer.RotationLayer`)."""

    adapter_layer_names = ("oft_R", "oft_embedding_R")
    other_param_names = ("r", "oft_block_size")
    container = "oft_R"

    def __init__(self, base_layer: nn.Module, in_features: int) -> None:
        super().__init__(base_layer)
        self.in_features = in_features
        self.oft_R = nn.ModuleDict()
        self.oft_embedding_R = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.oft_block_size: dict[str, int] = {}

    # ---- creation --------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: OFTConfig, module_name: str = "") -> None:
        r, block_size = block_layout(self.in_features, config.r, config.oft_block_size)
        weight = self.base_layer.weight
        getattr(self, self.container)[adapter_name] = OFTRotationModule(
            r,
            block_size,
            block_share=config.block_share,
            coft=config.coft,
            eps=config.eps,
            use_cayley_neumann=config.use_cayley_neumann,
            num_cayley_neumann_terms=config.num_cayley_neumann_terms,
            dropout=config.module_dropout,
            init_weights=config.init_weights,
            device=weight.device,
            dtype=adapter_dtype(self.base_layer),
        )
        self.r[adapter_name] = r
        self.oft_block_size[adapter_name] = block_size

    def rotation(self, adapter_name: str) -> OFTRotationModule:
        return getattr(self, self.container)[adapter_name]

    def blocks(self, adapter_name: str, dropout: bool = True) -> torch.Tensor:
        return self.rotation(adapter_name).blocks(dropout)

    def block_size(self, adapter_name: str) -> int:
        return self.oft_block_size[adapter_name]


class Linear(OFTLayer):
    """OFT for ``nn.Linear``: the input is rotated before the base layer."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer, base_layer.in_features)
        self.out_features = base_layer.out_features

    def adapted_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.base_layer(self.rotate(x, adapters), *args, **kwargs)

    def mixed_forward(self, x: torch.Tensor, routing: Routing, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.base_layer(self.rotate_rows(x, routing), *args, **kwargs)

    def fold(self, weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        return apply_blocks(weight, _transposed(blocks))  # W R^T


class Embedding(OFTLayer):
    """OFT for ``nn.Embedding``: the looked-up vectors are rotated (``oft_embedding_R``)."""

    container = "oft_embedding_R"
    merge_reversed = False

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer, base_layer.embedding_dim)

    def adapted_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.rotate(self.base_layer(x, *args, **kwargs), adapters)

    def mixed_forward(self, x: torch.Tensor, routing: Routing, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.rotate_rows(self.base_layer(x, *args, **kwargs), routing)

    def fold(self, weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        return apply_blocks(weight, blocks)  # E R


class Conv2d(OFTLayer):
    """OFT for ``nn.Conv2d``: the rotation acts on the ``in_channels * kh * kw`` patch features,
    folded into the kernel for each forward."""

    stack_refusal = (
        "OFT on a Conv2d rotates the plain conv's kernel and runs that convolution itself, so it cannot sit on "
        "top of another method's adapter layer (the adapters below would be skipped); in a mixed model add the "
        "OFT adapter for Conv2d modules first (other methods may stack on top of it), or leave those modules out"
    )
    """Read by mixed models: why this layer cannot be stacked over other adapter layers."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        if base_layer.groups != 1:
            raise NotImplementedError(f"OFT for grouped convolutions (groups={base_layer.groups}) is not supported")
        kh, kw = base_layer.kernel_size
        super().__init__(base_layer, base_layer.in_channels * kh * kw)

    def fold(self, weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        return apply_blocks(weight.flatten(1), _transposed(blocks)).reshape(weight.shape)

    def effective_weight(self, adapters: list[str]) -> torch.Tensor:
        weight = self.base_layer.weight
        w = weight.to(self.rotation_dtype())
        for name in reversed(adapters):  # patches rotated by R_a then R_b == kernel W R_b^T R_a^T
            w = self.fold(w, self.current_blocks(name))
        return w.to(weight.dtype)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.base_layer._conv_forward(x, weight, self.base_layer.bias)

    def adapted_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._conv(x, self.effective_weight(adapters))

    def mixed_forward(self, x: torch.Tensor, routing: Routing, *args: Any, **kwargs: Any) -> torch.Tensor:
        result: torch.Tensor | None = None
        for name, rows in routing.groups(x.shape[0], x.device).items():
            weight = self.effective_weight([name]) if self.has_adapter(name) else self.base_layer.weight
            part = self._conv(x.index_select(0, rows), weight)
            if result is None:
                result = part.new_empty((x.shape[0], *part.shape[1:]))
            result.index_copy_(0, rows, part)
        assert result is not None
        return result


def make_layer(config: OFTConfig, adapter_name: str, base_layer: nn.Module, module_name: str) -> OFTLayer | None:
    """The OFT layer for ``base_layer``'s type with ``adapter_name`` added, or None if unsupported."""
    if isinstance(base_layer, nn.Linear):
        layer: OFTLayer = Linear(base_layer)
    elif isinstance(base_layer, nn.Conv2d):
        layer = Conv2d(base_layer)
    elif isinstance(base_layer, nn.Embedding):
        layer = Embedding(base_layer)
    else:
        return None
    layer.update_layer(adapter_name, config, module_name)
    return layer
