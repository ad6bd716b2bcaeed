"""Products of Householder reflections in compact WY form (HRA now).

A reflection ``H(y) = I - 2 y y^T`` for a unit vector ``y``. The product of ``r`` of them,
``H(y_1) H(y_2) ... H(y_r)`` of ``d x d`` matrices, is kept in compact WY form
``I - Y T Y^T`` with ``Y = [y_1 ... y_r]`` (``[d, r]``) and ``T`` upper triangular (``[r, r]``):
``T^-1 = I / 2 + striu(Y^T Y)`` (Joffrain et al., *Accumulating Householder transformations,
revisited*, 2006). Applying it to rows costs ``2 d r`` per row plus an ``r x r`` product, never the
``d x d`` matrix. A zero column of ``Y`` reflects nothing (it drops out of ``Y T Y^T``), which
pads adapters of different ``r`` into one stack.

:func:`unit_columns` normalises raw vectors; :func:`gram_schmidt` orthonormalises them first
(in column order, classical Gram-Schmidt), after which the product is ``I - 2 Y Y^T``. A zero
vector reflects nothing in both; after Gram-Schmidt neither does one (numerically) dependent on the
earlier ones.

Every function takes optional leading batch dimensions (``[..., d, r]``).
"""

from __future__ import annotations

import torch


def _scaled(v: torch.Tensor, norm: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``v / norm`` where ``keep``, zero elsewhere; finite gradients everywhere (the dropped
    columns divide by 1, so neither the value nor its gradient is ever 0/0)."""
    return torch.where(keep, v / torch.where(keep, norm, torch.ones_like(norm)), torch.zeros_like(v))


def unit_columns(u: torch.Tensor) -> torch.Tensor:
    """``u[..., d, r]`` with each column scaled to unit length (zero columns stay zero)."""
    norm = u.norm(dim=-2, keepdim=True)
    return _scaled(u, norm, norm != 0)


def gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns ``[..., d, r]`` from ``u[..., d, r]`` by classical Gram-Schmidt in column
    order. A column whose residual after removing the earlier directions is below
    ``sqrt(eps)`` of its own length (it depends on them, or ``r > d``) becomes zero: it adds no
    reflection, where dividing by the tiny residual would give noise or NaN."""
    rtol = torch.finfo(u.dtype).eps ** 0.5
    columns: list[torch.Tensor] = []
    for i in range(u.shape[-1]):
        col = u[..., i : i + 1]  # [..., d, 1]
        residual = col
        if columns:
            q = torch.cat(columns, dim=-1)
            residual = col - q @ (q.transpose(-1, -2) @ col)
        norm = residual.norm(dim=-2, keepdim=True)
        keep = ~(norm <= rtol * col.norm(dim=-2, keepdim=True))  # NaN stays NaN: a broken vector shows
        columns.append(_scaled(residual, norm, keep))
    return torch.cat(columns, dim=-1)


def compact_wy(y: torch.Tensor) -> torch.Tensor:
    """``T[..., r, r]`` with ``H(y_1) ... H(y_r) = I - Y T Y^T`` for unit or zero columns ``y[..., d, r]``."""
    r = y.shape[-1]
    eye = torch.eye(r, device=y.device, dtype=y.dtype)
    index = torch.arange(r, device=y.device)
    # striu by a mask: torch.triu always starts a parallel region on CPU, milliseconds on a busy machine
    above = index[:, None] < index[None, :]
    t_inv = eye / 2 + torch.where(above, y.transpose(-1, -2) @ y, torch.zeros((), dtype=y.dtype, device=y.device))
    return torch.linalg.solve_triangular(t_inv, eye.expand_as(t_inv), upper=True)


def reflect(m: torch.Tensor, y: torch.Tensor, t: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``m[..., d] @ H`` with ``H = I - Y T Y^T`` (or ``@ H^T`` with ``transpose``: ``H``'s inverse,
    the reflections in reverse order). ``y``/``t`` are ``[d, r]``/``[r, r]``, or carry one leading
    batch dimension matching ``m``'s first one (one product per batch row)."""
    t = t.transpose(-1, -2) if transpose else t
    if y.dim() == 2:  # one fused m - (m Y T) Y^T: several times faster than the subtraction apart
        flat = m.reshape(-1, m.shape[-1])
        return torch.addmm(flat, (flat @ y) @ t, y.T, alpha=-1).reshape(m.shape)
    flat = m.reshape(m.shape[0], -1, m.shape[-1])  # [B, N, d]
    return torch.baddbmm(flat, torch.bmm(flat, y) @ t, y.transpose(-1, -2), alpha=-1).reshape(m.shape)

