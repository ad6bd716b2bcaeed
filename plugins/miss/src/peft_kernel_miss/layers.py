"""The MiSS layer for ``nn.Linear``. Imported on first use only (it imports torch).

One trainable block per adapter, in one of three shapes (``init_weights``):

* balance (``True`` / ``False``), block ``[r, out]``: input feature ``i`` uses row ``i % r``, so
  ``delta(x) = (x, zero-padded to a multiple of r, summed over its r-wide shards) @ block`` and
  ``delta W[:, i] = block[i % r]``;
* ``"mini"``, block ``[r, mini_r]``: the same with the block tiled ``out / mini_r`` times along the
  outputs, ``delta W[o, i] = block[i % r, o % mini_r]``;
* ``"bat"``, block ``[out / r, r, r]``: for the ``[r, r]`` weight block ``W_ab`` (output block ``a``,
  input block ``b``), ``delta W_ab = W_ab @ block[a] + block[a]``. The update depends on the weight
  it applies to: adapters fold in one after another, and unmerging inverts ``W -> W (I + block) + block``.

Dropout (``miss_dropout``) applies to the (zero-padded) input of the balance and mini updates; Bat
ignores it (as HF PEFT does).

Mixed batches (``adapter_names``) sum the input's shards once for every row and run one block
product per adapter group on its rows (sorted by adapter once per forward); Bat adapters apply their
cached ``delta W`` (:class:`~peft_kernel_lowrank.adapter_cache.AdapterCache`, rebuilt when the
block or the base weight changes), which a single Bat adapter's forward reuses too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from peft_kernel.plugin_api import AdapterLayer, ConfigError
from peft_kernel_lowrank.adapter_cache import AdapterCache
from peft_kernel_lowrank.grouped import sorted_rows
from peft_kernel_lowrank.mixed import base_output
from peft_kernel_miss.config import MissConfig

if TYPE_CHECKING:
    from peft_kernel.plugin_api import Routing
    from peft_kernel_lowrank.grouped import SortedRows

    _MixedPlan = tuple[SortedRows, int, torch.dtype, list[tuple[int, int, str, torch.Tensor]]]


class MissLinear(AdapterLayer):
    adapter_layer_names = ("miss_block",)
    other_param_names = ("miss_r", "miss_mini_r", "miss_mode", "miss_dropout")
    status_type_names = {"Linear": "MissLinear"}  # HF PEFT's class name in get_layer_status

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.miss_block = nn.ParameterDict()
        self.miss_dropout = nn.ModuleDict()
        self.miss_r: dict[str, int] = {}
        self.miss_mini_r: dict[str, int] = {}
        self.miss_mode: dict[str, str] = {}
        self._bat_deltas = AdapterCache()

    def update_layer(self, adapter_name: str, config: MissConfig, module_name: str = "") -> None:
        out_features, in_features = self.base_layer.weight.shape
        r, mode = config.r, _mode(config.init_weights)
        where = f"MiSS on {module_name or type(self.base_layer).__name__}"
        if r > in_features:
            raise ConfigError(f"{where}: `r` ({r}) must be less than or equal to in_features ({in_features})")
        if mode == "bat" and (in_features % r or out_features % r):
            raise ConfigError(f"{where}: init_weights='bat' needs in_features ({in_features}) and out_features "
                             f"({out_features}) divisible by `r` ({r}): the weight must split into [r, r] blocks")
        if mode == "mini" and out_features % config.mini_r:
            raise ConfigError(f"{where}: init_weights='mini' needs out_features ({out_features}) divisible by "
                             f"`mini_r` ({config.mini_r})")
        shape = {"bat": (out_features // r, r, r), "mini": (r, config.mini_r)}.get(mode, (r, out_features))
        block = torch.zeros(shape)
        if config.init_weights is False:
            nn.init.kaiming_uniform_(block, a=5**0.5)
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.miss_block[adapter_name] = nn.Parameter(block.to(weight.device, dtype))
        self.miss_r[adapter_name], self.miss_mini_r[adapter_name] = r, config.mini_r
        self.miss_mode[adapter_name] = mode
        self.miss_dropout[adapter_name] = nn.Dropout(config.miss_dropout) if config.miss_dropout > 0 else nn.Identity()

    # ---- additive protocol --------------------------------------------------------------------
    def delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        block = self.miss_block[adapter_name]
        if self.miss_mode[adapter_name] == "bat":
            return F.linear(x.to(block.dtype), self.cached_delta_weight(adapter_name))
        return self._block_product(_shard_sums(x, block.dtype, self.miss_r[adapter_name],
                                               self.miss_dropout[adapter_name]), adapter_name)

    def _block_product(self, shards: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The balance / mini update from the input's shard sums: ``shards @ block``, tiled along the
        outputs for mini."""
        block = self.miss_block[adapter_name]
        out = shards @ block
        if self.miss_mode[adapter_name] == "mini":
            out = out.tile(self.base_layer.weight.shape[0] // block.shape[1])
        return out

    def mixed_forward(self, x: torch.Tensor, routing: Routing, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each row with its own adapter, vectorised: the rows are sorted by adapter once, the
        balance / mini adapters' shard sums computed once for all of them, then one block product
        (or, for Bat, one product with the cached ``delta W``) per adapter group into one buffer that
        is added back in one scatter. The core's per-group path runs under autograd through the
        blocks, with live dropout, mixed ranks or extra arguments."""
        plan = None if args or kwargs or not x.is_floating_point() else routing.memo(
            ("peft_kernel_miss.mixed", id(self), x.shape[0], x.device),
            lambda: self._mixed_plan(routing, x.shape[0], x.device))
        if plan is None:
            return super().mixed_forward(x, routing, *args, **kwargs)
        rows, r, dtype, products = plan
        result = base_output(self.base_layer, x)
        xs = rows.gather(x).to(dtype)
        shards = _shard_sums(xs, dtype, r) if r else None
        delta = xs.new_empty(*xs.shape[:-1], result.shape[-1])
        for start, end, mode, weight in products:
            if mode == "bat":
                delta[start:end] = F.linear(xs[start:end], weight)
            elif mode == "mini":  # the [..., mini_r] product repeated along the outputs (``tile``)
                delta[start:end].unflatten(-1, (-1, weight.shape[1])).copy_((shards[start:end] @ weight).unsqueeze(-2))
            else:
                torch.matmul(shards[start:end], weight, out=delta[start:end])
        return rows.add_to(result, delta)

    def _mixed_plan(self, routing: Routing, batch: int, device: torch.device) -> _MixedPlan | None:
        """What :meth:`mixed_forward`'s shared path needs, built once per forward (weights and modes
        cannot change inside one): the sorted rows, the balance / mini ``r``, the blocks' dtype and
        per adapter group ``(start, end, mode, block or Bat's delta W)``. ``None`` where that path
        would not compute the rows as their own forwards do: blocks of several dtypes, several ``r``
        among the balance / mini adapters, live dropout, autograd through the blocks."""
        rows = sorted_rows(routing, self.adapter_names(), batch, device)
        if rows is None:
            return None
        grad = torch.is_grad_enabled()
        products, ranks, dtypes = [], set(), set()
        for name, start, end in rows.spans:
            block, mode = self.miss_block[name], self.miss_mode[name]
            if grad and block.requires_grad:
                return None
            dtypes.add(block.dtype)
            if mode != "bat":
                ranks.add(self.miss_r[name])
                if self.training and isinstance(self.miss_dropout[name], nn.Dropout):
                    return None
            products.append((start, end, mode, self.cached_delta_weight(name) if mode == "bat" else block))
        if len(dtypes) > 1 or len(ranks) > 1:
            return None
        return rows, ranks.pop() if ranks else 0, dtypes.pop(), products

    def cached_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """A Bat adapter's ``delta W`` on the current base weight, computed once and reused while the
        block and the base weight are unchanged (afresh under autograd through either)."""
        return self._bat_deltas.get(self, adapter_name, lambda: self._bat_delta(self.base_layer.weight, adapter_name),
                                    extra=(self.base_layer.weight,))

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._bat_deltas.drop(adapter_name)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The change to the current ``base_layer.weight`` (for Bat it depends on that weight)."""
        block = self.miss_block[adapter_name]
        mode = self.miss_mode[adapter_name]
        if mode == "bat":
            return self._bat_delta(self.base_layer.weight, adapter_name)
        out_features, in_features = self.base_layer.weight.shape
        rows = torch.arange(in_features, device=block.device) % self.miss_r[adapter_name]
        if mode == "mini":
            block = block.tile(out_features // block.shape[1])
        return block[rows].T

    def _bat_delta(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        block = self.miss_block[adapter_name]
        r = self.miss_r[adapter_name]
        out_features, in_features = weight.shape
        blocks = _split(weight.to(block.dtype), r)  # [out/r, in/r, r, r]
        delta = blocks @ block.unsqueeze(1) + block.unsqueeze(1)
        return _join(delta, out_features, in_features)

    # ---- Bat: weight-dependent, so adapters compose and unmerge by inversion --------------------
    def adapted_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Additive unless a Bat adapter is active: then the active adapters fold into the weight in
        order, each one's update computed on the weight the earlier ones left (as merging does), and
        the input goes through that weight once (without the balance/mini adapters' dropout)."""
        if not any(self.miss_mode[name] == "bat" for name in adapters):
            return super().adapted_forward(x, adapters, *args, **kwargs)
        weight = self.base_layer.weight
        for name in adapters:
            if self.miss_mode[name] == "bat":
                delta = self.cached_delta_weight(name) if weight is self.base_layer.weight else None
                weight = weight + (self._bat_delta(weight, name) if delta is None else delta)
            else:
                weight = weight + self.delta_weight(name)
        bias = self.base_layer.bias
        return F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype)).to(x.dtype)

    def unmerge_from_base(self, adapter_name: str) -> None:
        """Subtract a balance/mini update; invert a Bat one blockwise, ``W = (W' - b) (I + b)^-1``
        (solved in float64)."""
        if self.miss_mode[adapter_name] != "bat":
            super().unmerge_from_base(adapter_name)
            return
        weight = self.base_layer.weight
        block = self.miss_block[adapter_name].detach().to(torch.float64)
        r = self.miss_r[adapter_name]
        eye = torch.eye(r, dtype=block.dtype, device=block.device)
        blocks = _split(weight.detach().to(torch.float64), r) - block.unsqueeze(1)
        original = torch.linalg.solve(eye + block.unsqueeze(1), blocks, left=False)  # X (I + b) = W' - b
        with torch.no_grad():
            weight.copy_(_join(original, *weight.shape).to(weight.dtype))


def _shard_sums(x: torch.Tensor, dtype: torch.dtype, r: int, dropout: nn.Module | None = None) -> torch.Tensor:
    """``x`` in ``dtype``, zero-padded to a multiple of ``r`` (before dropout, as HF draws its mask),
    summed over its ``r``-wide shards: ``[..., r]``."""
    padded = x.to(dtype)
    if x.shape[-1] % r:
        padded = F.pad(padded, (0, -x.shape[-1] % r))
    if dropout is not None:
        padded = dropout(padded)
    return padded.unflatten(-1, (-1, r)).sum(-2)


def _split(weight: torch.Tensor, r: int) -> torch.Tensor:
    """``[out, in]`` -> ``[out/r, in/r, r, r]``: element ``[a, b]`` is the weight block of output rows
    ``a*r:(a+1)*r`` and input columns ``b*r:(b+1)*r``."""
    out_features, in_features = weight.shape
    return weight.reshape(out_features // r, r, in_features // r, r).transpose(1, 2)


def _join(blocks: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    return blocks.transpose(1, 2).reshape(out_features, in_features)


def _mode(init_weights: bool | str) -> str:
    return init_weights if isinstance(init_weights, str) else "balance"


def make_layer(config: MissConfig, adapter_name: str, base_layer: nn.Module, module_name: str) -> MissLinear | None:
    """The layer for ``base_layer``, or ``None`` for a type MiSS does not wrap (HF PEFT wraps only
    ``nn.Linear``)."""
    if not isinstance(base_layer, nn.Linear):
        return None
    layer = MissLinear(base_layer)
    layer.update_layer(adapter_name, config, module_name)
    return layer
