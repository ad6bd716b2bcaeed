"""OSF mixed batches (``adapter_names``) that read the shrink the adapters share once.

Every adapter of one preserved rank holds the same ``V0`` (the same SVD of the same weight), so its
``A = [V_low; V0]`` differs from another's only in its first half. The rows are sorted by adapter
once per forward, ``x V0^T`` runs once for all of them, and each adapter group runs its own
``x V_low^T`` and one product of ``u = [x V_low^T, x V0^T]`` with its ``B`` into one buffer that is
added back in one scatter. Each row's update is HF PEFT's ``(x A^T) B^T``: the same factor halves
in the same order, each inner product over the full ``2 r`` in one GEMM (a dense ``delta W`` or a
split ``B`` would round differently, beyond 1e-5 on large outputs).

Adapters with different ``V0`` (other preserved ranks), half-precision factors or factors of
another dtype than the base (HF rounds each delta to the base dtype), autograd through the adapters
(the projected-gradient path) and extra forward arguments take :class:`LowRankForwards`' paths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from peft_kernel_lowrank import mixed
from peft_kernel_lowrank.grouped import SortedRows, sorted_rows

if TYPE_CHECKING:
    from peft_kernel.plugin_api import Routing
    from peft_kernel_osf.layers import OSFLinear


class Plan(NamedTuple):
    """One layer's mixed batch, built once per forward (weights cannot change inside one)."""

    rows: SortedRows
    v0: torch.Tensor
    """The shared ``V0`` (``[r, in]``, in the factors' dtype)."""
    groups: list[tuple[int, int, torch.Tensor, torch.Tensor]]
    """Per adapter group with a trainable part: ``(start, end, V_low, B)`` in the sorted rows."""


def forward(layer: OSFLinear, x: torch.Tensor, routing: Routing) -> torch.Tensor | None:
    """``layer``'s mixed-batch output, or ``None`` where another path must run."""
    if not x.is_floating_point() or x.dim() < 2:
        return None
    plan = routing.memo(("peft_kernel_osf.mixed", id(layer), x.shape[0], x.device),
                        lambda: _plan(layer, routing, x.shape[0], x.device))
    if plan is None:
        return None
    rows, v0 = plan.rows, plan.v0
    xs = rows.gather(x).to(v0.dtype)
    r0 = v0.shape[0]
    shrunk = xs.new_empty(*xs.shape[:-1], 2 * r0)  # per row [x V_low^T, x V0^T]
    torch.matmul(xs, v0.T, out=shrunk[..., r0:])
    some_untrained = len(plan.groups) < len(rows.spans)  # their rows add zeros
    delta = (xs.new_zeros if some_untrained else xs.new_empty)(*xs.shape[:-1], layer.out_features)
    for start, end, v_low, b in plan.groups:
        torch.matmul(xs[start:end], v_low.T, out=shrunk[start:end, ..., :r0])
        torch.matmul(shrunk[start:end], b.T, out=delta[start:end])
    return rows.add_to(mixed.base_output(layer.base_layer, x), delta)


def _plan(layer: OSFLinear, routing: Routing, batch: int, device: torch.device) -> Plan | None:
    rows = sorted_rows(routing, layer.adapter_names(), batch, device)
    if rows is None or (len(rows.names) == 1 and rows.identity):
        return None
    used = [n for n in rows.names if layer.osf_svd_params[n]["S_low"].shape[0]]  # zero rank: no update
    if not used or (torch.is_grad_enabled() and any(t.requires_grad for n in used for t in layer._sources(n))):
        return None
    factors = {n: layer.low_rank_factors(n) for n in used}
    dtypes = {t.dtype for f in factors.values() for t in f[:2]}
    if dtypes != {layer.base_layer.weight.dtype} or dtypes & {torch.float16, torch.bfloat16} or not _share_v0(layer, used):
        return None
    r0 = layer._osf_V_low_init[used[0]].shape[0]
    groups = [(start, end, factors[n][0][:r0], factors[n][1]) for n, start, end in rows.spans if n in factors]
    return Plan(rows, factors[used[0]][0][r0:], groups)


def _share_v0(layer: OSFLinear, names: list[str]) -> bool:
    """Whether ``names`` hold equal ``V0``; remembered per set of adapters while those buffers are
    the same, unwritten tensors (kept referenced, so their ids cannot be reused)."""
    v0s = [layer._osf_V_low_init[n] for n in names]
    key = [(id(t), t._version, t.data_ptr()) for t in v0s]
    seen = layer.__dict__.setdefault("_osf_shared_v0", {})
    entry = seen.get(tuple(names))
    if entry is None or entry[0] != key:
        if len(seen) > 16:
            seen.clear()
        entry = seen[tuple(names)] = (key, v0s, all(t.shape == v0s[0].shape and torch.equal(t, v0s[0]) for t in v0s))
    return entry[2]
