"""Fast forwards for low-rank adapters on ``nn.Linear``: one adapter, and mixed batches of many.

Any adapter layer implementing the core's ``LowRankLayer`` protocol (``low_rank_factors(adapter)
-> (A, B, scale)``, optionally ``low_rank_bias``) gets these kernels: LoRA today, AdaLoRA, VeRA,
DeLoRA, RandLora next. Nothing here reads a method's attribute names.

Mixed batch (``adapter_names=[...]``, one adapter per row). Every adapter of a layer whose factors
are not ``None`` is kept in a *stack*, rank-padded with zeros (padding adds exact zeros, so
results do not change); the stack is the adapters' storage where it can be (see :class:`Stack`):

- ``A``  ``[S, r_max, in]``   — the ``A`` factors
- ``Bt`` ``[S, r_max, out]``  — ``B.T`` (the scales, one per slot, are applied by the kernels)
- ``bias`` ``[S, out]``       — the biases, when any adapter has one

Rows with no adapter in the layer read slot 0 with a scale of 0.

The stack is rebuilt only when an adapter changed (see :func:`get_stack`); freshness is checked
once per forward per layer (memoised on the forward's :class:`~peft_kernel.routing.Routing`), never per
token. The per-row metadata (slot per row, sort order, masks) is also built once per forward and
shared by every layer holding the same adapters.

Kernels, all exact rewrites of ``sum_rows scale * B(A(x))``:

- ``bmm``     gather each row's ``A`` / ``Bt`` from the stack, ``bmm`` then ``baddbmm_`` into the
  base output. Cost: the low-rank FLOPs plus copying ``rows * r * (in + out)`` weights. Default.
- ``concat``  one shrink GEMM against every adapter's ``A`` at once, a mask keeps each row's own
  block, one expand GEMM (``addmm_``) into the base output. Costs ``S`` times the low-rank FLOPs but
  no gathers: best for decode-sized inputs when the stack is small.
- ``grouped`` sort rows by adapter and run ``torch._grouped_mm`` segment matmuls (measured slower
  than ``bmm`` on CPU; kept selectable for other devices and for the benchmark). Where
  ``_grouped_mm`` cannot take the operands (float64, rows not 16-byte aligned) ``bmm`` runs instead.
- ``loop``    the core's group-by-adapter loop (reference path).

Adapters whose factors are ``None`` right now (DoRA, live dropout in training) and autograd
through adapter weights use the layer's own ``delta`` (those rows only; the other rows still take
the stacked kernel). ``PEFT_KERNEL_LORA_MIXED`` (the variable's name from when this lived in the
LoRA plugin) forces a kernel.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from peft_kernel.plugin_api import LowRankFactors, LowRankLayer, Routing

STRATEGIES = ("auto", "bmm", "concat", "slots", "grouped", "loop")
strategy: str = os.environ.get("PEFT_KERNEL_LORA_MIXED", "auto")
"""Which mixed-batch kernel to use: ``auto`` (chosen per shape) or one of :data:`STRATEGIES`."""

CONCAT_MAX_RANK = 64
"""``auto`` uses ``concat`` when the stack's total padded rank is at most this..."""
CONCAT_MAX_TOKENS = 64
"""...and the batch has at most this many tokens (decode)."""


# ---- one adapter ------------------------------------------------------------------------------
def can_add_inplace(result: torch.Tensor) -> bool:
    """Whether the adapter output may be accumulated into ``result`` in place."""
    return not torch.is_grad_enabled() and result.is_contiguous()


def low_rank_bias(layer: nn.Module, name: str) -> torch.Tensor | None:
    """The layer's optional ``low_rank_bias(name)`` (``[out]``, scaled like ``B``), else ``None``.
    Looked up on the class: an adapter layer reads missing attributes through to its base layer,
    which in a mixed model is another method's adapter layer with a ``low_rank_bias`` of its own."""
    get = getattr(type(layer), "low_rank_bias", None)
    return None if get is None else get(layer, name)


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` runs any hook (its own or a global one)."""
    hooks = nn.modules.module
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or hooks._global_forward_hooks or hooks._global_forward_pre_hooks
                or hooks._global_backward_hooks or hooks._global_backward_pre_hooks)


def base_output(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``base(x)``; a plain ``nn.Linear`` without hooks runs as ``F.linear`` directly (the same
    kernel without ``Module.__call__``'s dispatch: the hot path of a decode step)."""
    if type(base) is nn.Linear and not _hooked(base):
        params = base._parameters
        return F.linear(x, params["weight"], params["bias"])
    return base(x)


def add_single(layer: LowRankLayer, result: torch.Tensor, x: torch.Tensor, name: str,
               factors: LowRankFactors | None = None) -> torch.Tensor:
    """``result + scale * B(A(x)) (+ scale * bias)`` for one adapter whose
    ``low_rank_factors`` are not ``None`` (``factors``, if the caller has them already): one
    shrink GEMM and one fused ``addmm``."""
    a, b, scale = layer.low_rank_factors(name) if factors is None else factors
    bias = low_rank_bias(layer, name)
    if x.dtype != a.dtype:
        x = x.to(a.dtype)
    # fused in place for full precision; half-precision adapters (autocast_adapter_dtype=False) take
    # HF PEFT's separate roundings (B·u, then ·scaling, then +) so the output equals HF's bit for bit
    if result.dtype == b.dtype and result.dtype not in (torch.float16, torch.bfloat16) and can_add_inplace(result):
        return add_fused(result, x, a, b, scale, bias)
    # float32 adapters on a half-precision base: add in float32, round once (HF PEFT's result)
    return (result + F.linear(F.linear(x, a), b, bias) * scale).to(result.dtype)


def add_fused(result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
              bias: torch.Tensor | None) -> torch.Tensor:
    """``result += scale * (x·Aᵀ)·Bᵀ (+ scale * bias)`` in place: one shrink GEMM and one ``addmm_``
    (``result`` contiguous, autograd off, every tensor of one dtype)."""
    result.view(-1, result.shape[-1]).addmm_(F.linear(x.reshape(-1, x.shape[-1]), a), b.t(), alpha=scale)
    if bias is not None:
        result.add_(bias, alpha=scale)
    return result


# ---- stacks -----------------------------------------------------------------------------------
_Parts = tuple[torch.Tensor, torch.Tensor, float, "torch.Tensor | None"]
"""``(A, B, scale, bias)`` of one adapter."""


def _owns_storage(t: torch.Tensor) -> bool:
    """Whether ``t`` is a plain ``Parameter`` (no subclass with storage of its own kind) whose storage
    is exactly itself, in any dense layout (no view of a larger block; a transposed copy of an adopted
    ``B`` counts): such a tensor may move into a stack."""
    return (type(t) is nn.Parameter and not t.is_inference() and t.storage_offset() == 0 and 0 not in t.stride()
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


class Stack:
    """The stacked, rank-padded factors of one layer's low-rank adapters.

    The stack *is* the adapters' storage where it can be (*adoption*): an adapter's ``A`` parameter
    becomes the view ``A[i, :r]``, its ``B`` the view ``Bt[i, :r].T`` (each adapter's block is one
    contiguous run of memory whatever its rank), its bias ``bias[i]``, so nothing is held twice and
    a write to a parameter (optimizer step, ``copy_`` from a load or hotswap) is a write to the stack.
    Scales are not folded into ``Bt``: kernels apply them per slot. Tensors that are not parameters
    owning their whole storage (factors derived from other tensors, views, parameters another stack
    holds already) are copied in instead, as before, and followed through their ``_version``.
    """

    __slots__ = ("held", "names", "slot", "A", "Bt", "bias", "r", "zero", "scales", "scale", "refs", "views",
                 "pins", "signature", "compiled_slots", "compiled_scales", "compiled_order")

    def __init__(self, held: tuple[str, ...], factors: dict[str, _Parts], movable: frozenset[int] = frozenset()) -> None:
        """``movable``: ids of tensors adopted by the stack this one replaces (adopted here too)."""
        self.names = names = tuple(factors)
        self.slot = {n: i for i, n in enumerate(names)}
        self.zero = len(names)  # the slot number meaning "no adapter here" (no tensor behind it)
        first = factors[names[0]][0]
        device, dtype = first.device, first.dtype
        self.r = max(factors[n][0].shape[0] for n in names)
        in_features, out_features = first.shape[1], factors[names[0]][1].shape[0]
        size = len(names)
        self.A = torch.zeros(size, self.r, in_features, device=device, dtype=dtype)
        self.Bt = torch.zeros(size, self.r, out_features, device=device, dtype=dtype)
        has_bias = any(factors[n][3] is not None for n in names)
        self.bias = torch.zeros(size, out_features, device=device, dtype=dtype) if has_bias else None
        self.compiled_slots: torch.Tensor | None = None  # see peft_kernel_lowrank.compiled
        self.compiled_scales: torch.Tensor | None = None
        self.compiled_order: tuple[str, ...] | None = None  # the model's adapter order compiled_slots maps
        self._fill(held, factors, movable)

    def __deepcopy__(self, memo: dict) -> None:
        """A deep-copied layer gets no stack (its parameters are copied on their own, not as views;
        the copy builds its own stack on its first mixed batch)."""
        return None

    def refill(self, held: tuple[str, ...], factors: dict[str, _Parts]) -> bool:
        """Update the stack in place (its tensors keep their identity, so compiled graphs that read
        them stay valid) when the adapters and shapes are the same; ``False`` if they are not."""
        if tuple(factors) != self.names:
            return False
        parts = [t for a, b, _, bias in factors.values() for t in (a, b, bias) if t is not None]
        if any(t.dtype != self.A.dtype or t.device != self.A.device for t in parts):
            return False
        if (max(a.shape[0] for a, *_ in factors.values()) != self.r
                or any(a.shape[1] != self.A.shape[2] or b.shape[0] != self.Bt.shape[2] for a, b, *_ in factors.values())
                or any(bias is not None for *_, bias in factors.values()) != (self.bias is not None)):
            return False
        self._fill(held, factors)
        return True

    def _fill(self, held: tuple[str, ...], factors: dict[str, _Parts], movable: frozenset[int] = frozenset()) -> None:
        """Bring every slot up to date: a tensor that is already this stack's view is left alone,
        any other is copied in (its rank padding zeroed) and adopted where it may be."""
        self.held = held
        self.compiled_order = None
        refs, views = [], []
        ids = [id(t) for a, b, _, bias in factors.values() for t in (a, b, bias) if t is not None]
        unique = len(set(ids)) == len(ids)  # one tensor in two roles is never adopted
        with torch.no_grad():
            for i, n in enumerate(self.names):
                a, b, _, bias = factors[n]
                r = a.shape[0]
                slots = [(a, self.A[i, :r], self.A[i, r:]), (b, self.Bt[i, :r].t(), self.Bt[i, r:])]
                if bias is not None:
                    slots.append((bias, self.bias[i], None))
                for t, view, padding in slots:
                    refs.append(t)
                    views.append(_place(t, view, padding, unique and (id(t) in movable or _owns_storage(t))))
        self.scales = tuple(float(factors[n][2]) for n in self.names)
        self.scale = self.scales[0] if len(set(self.scales)) == 1 else None
        self.refs = refs
        self.views = views
        # aliases of the copied (not adopted) tensors' storages, kept alive so that a storage replaced
        # behind our back (``p.data = new``, ``.to()``) cannot be freed and its address handed to the
        # new one, which would make ``data_ptr`` look unchanged
        self.pins = [t.detach() for t, v in zip(refs, views) if not v]
        self.signature = _signature(factors)

    def fresh(self, held: tuple[str, ...], factors: dict[str, _Parts]) -> bool:
        """True while no adapter of the layer was added, removed, rescaled, replaced, moved or
        written to. ``factors`` are the layer's current ones: ``load_state_dict(assign=True)`` puts
        new ``Parameter`` objects in place of the stacked ones (the stacked ones are held in
        ``refs``, so their ``id`` cannot be reused). A write to an adopted tensor already is a write
        to the stack: the refill it triggers finds every adopted tensor in its slot and copies nothing."""
        return held == self.held and tuple(factors) == self.names and _signature(factors) == self.signature

    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in self.refs)

    def adopted(self) -> frozenset[int]:
        """Ids of the tensors that are views of this stack now."""
        storages = self._storages()
        return frozenset(id(t) for t, view in zip(self.refs, self.views)
                         if view and t.untyped_storage().data_ptr() in storages)

    def _storages(self) -> set[int]:
        tensors = (self.A, self.Bt) if self.bias is None else (self.A, self.Bt, self.bias)
        return {t.untyped_storage().data_ptr() for t in tensors}

    def release(self) -> None:
        """Give every adopted tensor still viewing this stack a storage of its own again (the stack is
        being forgotten: an adapter deleted, a layer's adapters re-shaped), so the stack's memory is
        freed with it."""
        adopted = self.adopted()
        with torch.no_grad():
            for t in self.refs:
                if id(t) in adopted:
                    t.data = t.data.clone(memory_format=torch.contiguous_format)
        self.views = [False] * len(self.refs)


def _place(t: torch.Tensor, view: torch.Tensor, padding: torch.Tensor | None, adopt: bool) -> bool:
    """Put ``t`` into its slot ``view`` of a stack (``padding``: the slot's rank padding, zeroed);
    ``True`` when ``t`` is (now) that view itself."""
    if t.data_ptr() == view.data_ptr() and t.shape == view.shape and t.stride() == view.stride():
        return True  # already the slot
    view.copy_(t)
    if padding is not None:
        padding.zero_()
    if adopt:
        t.data = view
        return True
    return False


def _signature(factors: dict[str, _Parts]) -> list[float]:
    """Each stacked tensor's identity, ``_version`` and ``data_ptr``, and each scale, flat: one
    list comparison tells whether anything changed."""
    out: list[float] = []
    for a, b, scale, bias in factors.values():
        out += (id(a), a._version, a.data_ptr(), id(b), b._version, b.data_ptr(), scale)
        if bias is not None:
            out += (id(bias), bias._version, bias.data_ptr())
        else:
            out.append(-1)
    return out


def stack_factors(layer: LowRankLayer, held: tuple[str, ...]) -> dict[str, _Parts]:
    """The adapters that go into the stack, with their factors: those whose ``low_rank_factors``
    are not ``None`` (DoRA, live dropout... take the generic path). A layer may answer for all of
    them at once with an optional ``low_rank_parts(names)`` returning this same dict (read on every
    mixed-batch forward, so a layer can do its layer-wide checks once instead of per adapter)."""
    many = getattr(type(layer), "low_rank_parts", None)
    if many is not None:
        return many(layer, held)
    out = {}
    for n in held:
        factors = layer.low_rank_factors(n)
        if factors is not None:
            out[n] = (*factors, low_rank_bias(layer, n))
    return out


def get_stack(layer: LowRankLayer) -> Stack | None:
    """The layer's current stack, rebuilt if any adapter changed since it was built.

    Freshness: the adapters the layer holds and which of them are low-rank right now, each
    tensor's identity (``load_state_dict(assign=True)`` swaps in new ``Parameter`` objects) and
    ``data_ptr`` (``.to()``, ``.data =``: an adopted tensor moved out of the stack; the old storages
    of copied tensors are pinned so their addresses cannot be reused), a copied tensor's
    ``_version`` (bumped by every in-place write: optimizer steps, ``copy_`` from ``load_adapter`` /
    ``hotswap_adapter``; an adopted tensor's writes land in the stack itself), and the scales
    (``rescale_adapter_scale``, ``hotswap_adapter``). A replaced stack is released: its adopted
    tensors move into the new one, any left (adapters not stacked now) get their own storage back."""
    held = tuple(layer.adapter_names())
    factors = stack_factors(layer, held)
    stack = layer.__dict__.get("_low_rank_stack")
    if stack is not None and stack.fresh(held, factors):
        return stack
    if not factors:
        return None
    parts = [t for a, b, _, bias in factors.values() for t in (a, b, bias) if t is not None]
    if len({t.dtype for t in parts}) != 1 or len({t.device for t in parts}) != 1:
        drop_stack(layer)  # adapters of several dtypes (one moved): no stack, and none kept alive
        return None
    with torch.inference_mode(False):  # normal tensors: autograd may use the stack after inference mode
        if stack is not None and stack.refill(held, factors):
            return stack
        new = Stack(held, factors, stack.adopted() if stack is not None else frozenset())
        if stack is not None:
            stack.release()
    layer.__dict__["_low_rank_stack"] = new  # a plain attribute: not a buffer, not in the state dict
    return new


def drop_stack(layer: nn.Module) -> None:
    """Forget a layer's stack (it is rebuilt on the next mixed batch); tensors it held get their
    own storage back, so a deleted adapter's memory is freed with the stack."""
    stack = layer.__dict__.pop("_low_rank_stack", None)
    if stack is not None:
        stack.release()


# ---- per-forward routing metadata ---------------------------------------------------------------
class Plan:
    """How the rows of one forward map onto a stack's slots (built once per forward and stack)."""

    def __init__(self, names: tuple[str, ...], routing: Routing, batch: int, device: torch.device) -> None:
        slot = {n: i for i, n in enumerate(names)}
        zero = len(names)
        repeat = batch // len(routing.names)
        per_row = [slot.get(n, zero) for n in routing.names for _ in range(repeat)]
        self.batch = batch
        self.device = device
        self.slots_list = per_row
        # rows without an adapter read slot 0 (there is no zero slot), multiplied by a scale of 0
        self.slots = torch.tensor([0 if s == zero else s for s in per_row], device=device, dtype=torch.long)
        used = sorted({s for s in per_row if s != zero})
        self.used = used
        self.all_in = zero not in per_row
        order = sorted((s, i) for i, s in enumerate(per_row) if s != zero)
        self.n_in = len(order)
        self.perm = torch.tensor([i for _, i in order], device=device, dtype=torch.long)
        counts = [0] * zero
        for s, _ in order:
            counts[s] += 1
        self.counts = counts
        self.zero = zero
        self._groups(per_row, order, device)
        self._offs: dict[int, torch.Tensor] = {}
        self._masks: dict[tuple, torch.Tensor] = {}
        self._scales: dict[tuple, torch.Tensor] = {}

    def _groups(self, per_row: list[int], order: list[tuple[int, int]], device: torch.device) -> None:
        """The ``slots`` kernel's layout: the rows of each used adapter side by side, ``width`` rows
        per adapter (short groups padded with row 0, whose results are dropped)."""
        used, counts = self.used, self.counts
        self.width = width = max((counts[s] for s in used), default=0)
        self.balanced = all(counts[s] == width for s in used)
        self.in_place = self.all_in and self.balanced and per_row == sorted(per_row)  # rows already grouped
        rows, valid = [], []
        start = 0
        for s in used:
            group = [i for _, i in order[start:start + counts[s]]]
            start += counts[s]
            valid += range(len(rows), len(rows) + len(group))
            rows += group + [0] * (width - len(group))
        self.gather = torch.tensor(rows, device=device, dtype=torch.long)
        self.valid = None if self.balanced else torch.tensor(valid, device=device, dtype=torch.long)
        step = used[1] - used[0] if len(used) > 1 else 1
        self.used_slice = (slice(used[0], used[-1] + 1, step)
                           if used and step > 0 and used == list(range(used[0], used[-1] + 1, step)) else None)
        self.used_index = torch.tensor(used, device=device, dtype=torch.long)

    def take(self, stacked: torch.Tensor) -> torch.Tensor:
        """The used adapters' entries of a stacked tensor: a view where they are evenly spaced."""
        return stacked[self.used_slice] if self.used_slice is not None else stacked.index_select(0, self.used_index)

    def offs(self, tokens: int) -> torch.Tensor:
        if tokens not in self._offs:
            ends, total = [], 0
            for c in self.counts:
                total += c * tokens
                ends.append(total)
            self._offs[tokens] = torch.tensor(ends, device=self.device, dtype=torch.int32)
        return self._offs[tokens]

    def mask(self, r: int, scales: tuple[float, ...], dtype: torch.dtype) -> torch.Tensor:
        """``[batch, zero * r]``: the row's adapter's scale on its own adapter block, 0 elsewhere."""
        key = (r, scales, dtype)
        if key not in self._masks:
            mask = torch.zeros(self.batch, self.zero, r, dtype=dtype)
            for row, s in enumerate(self.slots_list):
                if s != self.zero:
                    mask[row, s] = scales[s]
            self._masks[key] = mask.view(self.batch, self.zero * r).to(self.device)
        return self._masks[key]

    def scales(self, kind: str, scales: tuple[float, ...], dtype: torch.dtype, tokens: int = 1) -> torch.Tensor:
        """Per-slot scales laid out for a kernel: ``rows`` ``[batch, 1, 1]`` (0 for rows without an
        adapter), ``used`` ``[used, 1, 1]``, ``sorted`` ``[rows with an adapter * tokens, 1]``."""
        key = (kind, scales, dtype, tokens)
        if key not in self._scales:
            if kind == "rows":
                values = [0.0 if s == self.zero else scales[s] for s in self.slots_list]
            elif kind == "used":
                values = [scales[s] for s in self.used]
            else:
                values = [scales[s] for s in self.used for _ in range(self.counts[s] * tokens)]
            shape = (-1, 1) if kind == "sorted" else (-1, 1, 1)
            self._scales[key] = torch.tensor(values, dtype=dtype).view(shape).to(self.device)
        return self._scales[key]


def _plan(routing: Routing, names: tuple[str, ...], batch: int, device: torch.device) -> Plan:
    return routing.memo(("peft_kernel_lowrank.plan", names, batch, device), lambda: Plan(names, routing, batch, device))


def _forward_stack(layer: LowRankLayer, routing: Routing) -> Stack | None:
    """The layer's stack, validated once per forward (weights cannot change inside one forward)."""
    return routing.memo(("peft_kernel_lowrank.stack", id(layer)), lambda: get_stack(layer))


def choose(plan: Plan, stack: Stack, tokens: int) -> str:
    if strategy != "auto":
        return strategy
    if len(plan.used) == 1 and plan.all_in:
        return "single"
    if plan.n_in * tokens <= CONCAT_MAX_TOKENS and stack.zero * stack.r <= CONCAT_MAX_RANK:
        return "concat"
    if plan.in_place or tokens * plan.width * len(plan.used) <= stack.r * plan.n_in:
        return "slots"  # moving the rows' inputs and outputs costs less than gathering each row's factors
    return "bmm"


# ---- mixed batch ------------------------------------------------------------------------------
def mixed_forward(layer: LowRankLayer, x: torch.Tensor, routing: Routing, *args: Any, **kwargs: Any) -> torch.Tensor | None:
    """The mixed-batch output of ``layer`` (an ``AdapterLayer`` implementing ``low_rank_factors``
    on a linear base), or ``None`` where the generic path must run instead."""
    if strategy == "loop" or args or kwargs:
        return None
    stack = _forward_stack(layer, routing)
    if stack is None or stack.needs_grad():
        return None
    if x.dim() < 2 or not x.is_floating_point():
        return None
    batch = x.shape[0]
    routing._repeat(batch)  # the core's check: a clear error when rows and names disagree
    plan = _plan(routing, stack.names, batch, x.device)
    result = base_output(layer.base_layer, x)
    if plan.used:
        tokens = x.numel() // (batch * x.shape[-1]) if batch else 0
        how = choose(plan, stack, tokens)
        if how == "single":
            result = add_single(layer, result, x, stack.names[plan.used[0]])
        else:
            result = _KERNELS[how](stack, plan, result, x, tokens)
    return _add_generic_rows(layer, result, x, routing, stack)


def _add_generic_rows(layer: LowRankLayer, result: torch.Tensor, x: torch.Tensor, routing: Routing, stack: Stack) -> torch.Tensor:
    """Rows whose adapter this layer holds but the stack does not (DoRA...): the layer's own delta."""
    if len(stack.names) == len(stack.held):
        return result
    for name, rows in routing.groups(x.shape[0], x.device).items():
        if name in stack.slot or name not in stack.held:
            continue
        delta = layer.delta(x.index_select(0, rows), name).to(result.dtype)
        result = result.index_add(0, rows, delta)
    return result


def _accumulate(result3: torch.Tensor, delta3: torch.Tensor) -> torch.Tensor:
    if can_add_inplace(result3) and delta3.dtype == result3.dtype:
        return result3.add_(delta3)
    return result3 + delta3.to(result3.dtype)


def _add_bias(stack: Stack, plan: Plan, result3: torch.Tensor) -> torch.Tensor:
    if stack.bias is None:
        return result3
    rows = stack.bias.index_select(0, plan.slots).unsqueeze(1)  # [batch, 1, out]
    return _accumulate(result3, rows * plan.scales("rows", stack.scales, rows.dtype))


def _row_alpha(stack: Stack, plan: Plan, u: torch.Tensor) -> float:
    """Scale ``u`` (``[batch, tokens, r]``, this kernel's own) by each row's scale where they differ
    or some rows have no adapter here; else return the one scale, for the accumulating GEMM."""
    if stack.scale is not None and plan.all_in:
        return stack.scale
    u.mul_(plan.scales("rows", stack.scales, u.dtype))
    return 1.0


def _bmm(stack: Stack, plan: Plan, result: torch.Tensor, x: torch.Tensor, tokens: int) -> torch.Tensor:
    batch = plan.batch
    x3 = x.reshape(batch, tokens, x.shape[-1]).to(stack.A.dtype)
    a_rows = stack.A.index_select(0, plan.slots)  # [batch, r, in]
    u = torch.bmm(x3, a_rows.transpose(1, 2))  # [batch, tokens, r]
    alpha = _row_alpha(stack, plan, u)
    b_rows = stack.Bt.index_select(0, plan.slots)  # [batch, r, out]
    result3 = result.view(batch, tokens, result.shape[-1])
    if can_add_inplace(result3) and result3.dtype == b_rows.dtype:
        result3.baddbmm_(u, b_rows, alpha=alpha)
    else:
        result3 = result3 + (torch.bmm(u, b_rows) * alpha).to(result3.dtype)
    return _add_bias(stack, plan, result3).view(result.shape)


def _concat(stack: Stack, plan: Plan, result: torch.Tensor, x: torch.Tensor, tokens: int) -> torch.Tensor:
    batch, n, r = plan.batch, stack.zero, stack.r
    x3 = x.reshape(batch, tokens, x.shape[-1]).to(stack.A.dtype)
    u = F.linear(x3, stack.A[:n].reshape(n * r, x.shape[-1]))  # [batch, tokens, n * r]
    u.mul_(plan.mask(r, stack.scales, u.dtype).unsqueeze(1))
    b_all = stack.Bt[:n].reshape(n * r, -1)
    result3 = result.view(batch, tokens, result.shape[-1])
    if can_add_inplace(result3) and result3.dtype == b_all.dtype:
        result3.view(batch * tokens, -1).addmm_(u.view(batch * tokens, n * r), b_all)
    else:
        result3 = result3 + (u @ b_all).to(result3.dtype)
    return _add_bias(stack, plan, result3).view(result.shape)


def _slots(stack: Stack, plan: Plan, result: torch.Tensor, x: torch.Tensor, tokens: int) -> torch.Tensor:
    """Rows grouped by adapter, one ``bmm`` per factor over the used adapters (each adapter's
    factors read once, not copied per row); the rows' inputs are gathered and their outputs
    scattered back unless the batch is already grouped."""
    k, width = len(plan.used), plan.width
    d_in, d_out = x.shape[-1], result.shape[-1]
    x3 = x.reshape(plan.batch, tokens, d_in).to(stack.A.dtype)
    xs = x3 if plan.in_place else x3.index_select(0, plan.gather)
    u = torch.bmm(xs.reshape(k, width * tokens, d_in), plan.take(stack.A).transpose(1, 2))  # [k, width * tokens, r]
    alpha = stack.scale
    if alpha is None:
        u.mul_(plan.scales("used", stack.scales, u.dtype))
        alpha = 1.0
    b_used = plan.take(stack.Bt)  # [k, r, out]
    result3 = result.view(plan.batch, tokens, d_out)
    inplace = can_add_inplace(result3) and result3.dtype == b_used.dtype
    if plan.in_place and inplace:
        result3.view(k, width * tokens, d_out).baddbmm_(u, b_used, alpha=alpha)
    else:
        d = torch.bmm(u, b_used)
        d = (d if alpha == 1.0 else d * alpha).view(k * width, tokens, d_out).to(result3.dtype)
        if plan.in_place:
            result3 = result3 + d
        else:
            rows = plan.gather
            if plan.valid is not None:
                d, rows = d.index_select(0, plan.valid), rows.index_select(0, plan.valid)
            result3 = result3.index_add_(0, rows, d) if inplace else result3.index_add(0, rows, d)
    return _add_bias(stack, plan, result3).view(result.shape)


_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_ok(stack: Stack, d_in: int, d_out: int) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands: float32/16 and bfloat16 only, and every
    matrix's row stride a multiple of 16 bytes; torch before 2.8 has no ``_grouped_mm`` at all."""
    size = stack.A.element_size()
    return (hasattr(torch, "_grouped_mm") and stack.A.dtype in _GROUPED_DTYPES
            and all(d * size % 16 == 0 for d in (d_in, stack.r, d_out)))


def _grouped(stack: Stack, plan: Plan, result: torch.Tensor, x: torch.Tensor, tokens: int) -> torch.Tensor:
    batch, n = plan.batch, stack.zero
    d_in, d_out = x.shape[-1], result.shape[-1]
    if not _grouped_ok(stack, d_in, d_out):
        return _bmm(stack, plan, result, x, tokens)  # same rows, another kernel
    x3 = x.reshape(batch, tokens, d_in).to(stack.A.dtype)
    xs = x3.index_select(0, plan.perm).reshape(plan.n_in * tokens, d_in)
    offs = plan.offs(tokens)
    u = torch._grouped_mm(xs, stack.A[:n].transpose(1, 2), offs=offs)
    u = u * (stack.scale if stack.scale is not None else plan.scales("sorted", stack.scales, u.dtype, tokens))
    d = torch._grouped_mm(u, stack.Bt[:n], offs=offs).view(plan.n_in, tokens, d_out)
    result3 = result.view(batch, tokens, d_out)
    if can_add_inplace(result3) and result3.dtype == d.dtype:
        result3.index_add_(0, plan.perm, d)
    else:
        result3 = result3.index_add(0, plan.perm, d.to(result3.dtype))
    return _add_bias(stack, plan, result3).view(result.shape)


_KERNELS = {"bmm": _bmm, "concat": _concat, "grouped": _grouped, "slots": _slots}
