"""The KV-cache write as index ops: ``ScatterND`` of the new keys/values at their positions.

QEfficient writes the cache with its ``CtxScatter`` custom op (an ``ScatterND`` with
``[batch, head, position]`` indices, out-of-range indices dropped on the device). Here the same
pattern is plain ONNX (``ScatterND`` / ``GatherND``, opset 11+), so ONNX Runtime runs it too, which
means no index may be out of range: a padding token (``position_ids = -1``) is pointed at a slot no
real token of the call writes and writes back the value already there (read with ``GatherND``), so
padding never changes the cache and no two updates share an index.

The slot of token ``s`` of a row is ``position`` for real tokens and ``(first + s) mod ctx_len``
for padding, ``first`` being the position of the row's first token (clamped at 0). With the layout
the runtime feeds (real tokens first, consecutive positions, then padding; ``seq_len <= ctx_len``)
these slots are distinct within the row. In continuous-batching graphs the cache has
``full_batch_size`` rows and ``batch_index`` says which row each input row writes; the rows of one
call must be distinct.
"""

from __future__ import annotations

import torch


class ScatterND(torch.autograd.Function):
    """``out = data; out[indices[..., 0], ..., indices[..., k-1]] = updates`` -> ONNX ``ScatterND``."""

    @staticmethod
    def forward(ctx, data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        out = data.clone()
        out[indices.unbind(-1)] = updates
        return out

    @staticmethod
    def symbolic(g, data, indices, updates):
        return g.op("ScatterND", data, indices, updates)


class GatherND(torch.autograd.Function):
    """``data[indices[..., 0], ..., indices[..., k-1]]`` -> ONNX ``GatherND``."""

    @staticmethod
    def forward(ctx, data: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return data[indices.unbind(-1)]

    @staticmethod
    def symbolic(g, data, indices):
        return g.op("GatherND", data, indices)


def write_indices(position_ids: torch.Tensor, rows: torch.Tensor, num_heads: int, ctx_len: int) -> torch.Tensor:
    """``[batch, num_heads, seq_len, 3]`` (cache row, head, slot) indices of a call's KV write.

    ``rows`` ``[batch]``: the cache row of each input row (``batch_index``, or ``0..batch-1``).
    """
    batch, seq = position_ids.shape
    first = position_ids[:, :1].clamp(min=0)
    spare = torch.remainder(first + torch.arange(seq, device=position_ids.device).view(1, seq), ctx_len)
    slot = torch.where(position_ids >= 0, position_ids, spare)  # [B, S]
    shape = (batch, num_heads, seq)
    return torch.stack(
        (
            rows.view(batch, 1, 1).expand(shape),
            torch.arange(num_heads, device=position_ids.device).view(1, num_heads, 1).expand(shape),
            slot.view(batch, 1, seq).expand(shape),
        ),
        dim=-1,
    )


def write_kv(cache: torch.Tensor, indices: torch.Tensor, new: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The cache with ``new`` ``[batch, heads, seq, dim]`` written at ``indices`` where ``valid``.

    ``valid`` ``[batch, 1, seq, 1]``: real tokens; padding writes back what the cache holds.
    """
    updates = torch.where(valid, new, GatherND.apply(cache, indices))
    return ScatterND.apply(cache, indices, updates)
