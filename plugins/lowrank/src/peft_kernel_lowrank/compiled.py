"""The ``torch.compile`` path of low-rank layers (see :mod:`peft_kernel.compiled` in the core).

Before each compiled forward, :func:`prepare` refreshes the layer's stack of
:mod:`peft_kernel_lowrank.mixed` eagerly and in place (a hotswap or ``rescale`` rewrites its values,
the tensors keep their identity) and maps the model's adapter ids onto the stack's slots
and scales (``compiled_slots`` and ``compiled_scales``, ``[adapters + 1]``, in place too; an adapter
the layer does not hold reads slot 0 with scale 0). :func:`forward` — what Dynamo traces — reads
only the rows' adapter ids and these tensors: ``A``, ``B.T``, the scale and the bias of each row's
slot are gathered (``index_select``), so the routing, the active adapter and the scalings are values
in tensors, never guards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from peft_kernel.plugin_api import compiled_rows
from peft_kernel_lowrank import mixed

if TYPE_CHECKING:
    from peft_kernel.plugin_api import LowRankLayer


def prepare(layer: LowRankLayer, order: tuple[str, ...]) -> bool:
    """Refresh ``layer``'s stack for a compiled forward; ``False`` where the stacked kernels cannot
    serve every adapter of the layer now (DoRA, live dropout, autograd through the adapters)."""
    stack = mixed.get_stack(layer)
    if stack is None:
        return not layer.adapter_names()  # a layer without adapters adds nothing: still compiled
    if len(stack.names) != len(stack.held) or stack.needs_grad():
        return False
    if stack.compiled_order == order:
        return True
    slots = [stack.slot.get(n, 0) for n in order] + [0]
    scales = [stack.scales[stack.slot[n]] if n in stack.slot else 0.0 for n in order] + [0.0]
    current = stack.compiled_slots
    if current is not None and current.shape[0] == len(slots):
        current.copy_(torch.tensor(slots))
        stack.compiled_scales.copy_(torch.tensor(scales))
    else:
        with torch.inference_mode(False):
            stack.compiled_slots = torch.tensor(slots, dtype=torch.long, device=stack.A.device)
            stack.compiled_scales = torch.tensor(scales, dtype=stack.A.dtype, device=stack.A.device)
    stack.compiled_order = order
    return True


def forward(layer: LowRankLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor | None:
    """Base output plus each row's adapter, from the stack; ``None`` outside a compiled forward."""
    rows = compiled_rows()
    if rows is None or args or kwargs or x.dim() < 2 or not x.is_floating_point():
        return None
    stack = layer.__dict__.get("_low_rank_stack")
    result = layer.base_layer(x)
    if stack is None:
        return result
    slots = stack.compiled_slots.index_select(0, rows)
    scales = stack.compiled_scales.index_select(0, rows)
    xa = x.to(stack.A.dtype)
    same = result.dtype == stack.A.dtype
    if rows.shape[0] == 1:  # one adapter for every row: two GEMMs, the second accumulating
        u = F.linear(xa, stack.A.index_select(0, slots)[0]) * scales
        bt = stack.Bt.index_select(0, slots)[0]
        out = result.reshape(-1, result.shape[-1])
        out = torch.addmm(out, u.reshape(-1, u.shape[-1]), bt) if same else out + (u.reshape(-1, u.shape[-1]) @ bt).to(out.dtype)
        if stack.bias is not None:
            out = out + (stack.bias.index_select(0, slots) * scales.unsqueeze(1)).to(out.dtype)
        return out.view(result.shape)
    batch = x.shape[0]
    if batch != rows.shape[0]:  # generate's beams / returned sequences: each row's name repeated
        slots = slots.repeat_interleave(batch // rows.shape[0])
        scales = scales.repeat_interleave(batch // rows.shape[0])
    x3 = xa.reshape(batch, -1, x.shape[-1])
    u = torch.bmm(x3, stack.A.index_select(0, slots).transpose(1, 2)) * scales.view(-1, 1, 1)
    b_rows = stack.Bt.index_select(0, slots)
    out = result.reshape(batch, -1, result.shape[-1])
    out = torch.baddbmm(out, u, b_rows) if same else out + torch.bmm(u, b_rows).to(out.dtype)
    if stack.bias is not None:
        out = out + (stack.bias.index_select(0, slots) * scales.unsqueeze(1)).unsqueeze(1).to(out.dtype)
    return out.view(result.shape)
