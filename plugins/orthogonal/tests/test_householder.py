"""The compact WY form of Householder products against explicit products of reflections."""

import pytest
import torch

from peft_kernel_orthogonal.householder import compact_wy, gram_schmidt, reflect, unit_columns


def reflection(v: torch.Tensor) -> torch.Tensor:
    return torch.eye(len(v), dtype=v.dtype) - 2 * torch.outer(v, v) / (v @ v)


def explicit_product(u: torch.Tensor) -> torch.Tensor:
    """``H(u_1) H(u_2) ... H(u_r)``, one dense matrix product per reflection."""
    product = torch.eye(u.shape[0], dtype=u.dtype)
    for i in range(u.shape[1]):
        product = product @ reflection(u[:, i])
    return product


def dense(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return reflect(torch.eye(y.shape[-2], dtype=y.dtype), y, t)


@pytest.mark.parametrize("d, r", [(7, 1), (7, 4), (5, 5), (4, 9)])
def test_compact_wy_equals_the_explicit_product(d, r):
    u = torch.randn(d, r, generator=torch.Generator().manual_seed(d * r), dtype=torch.float64)
    y = unit_columns(u)
    t = compact_wy(y)
    torch.testing.assert_close(dense(y, t), explicit_product(u), atol=1e-12, rtol=0)
    assert torch.equal(t, torch.triu(t))


def test_reflect_transposed_is_the_inverse_and_rows_apply_their_own_product():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)  # one product per batch row
    y = unit_columns(u)
    t = compact_wy(y)
    m = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)
    out = reflect(m, y, t)
    for b in range(3):
        torch.testing.assert_close(out[b], m[b] @ explicit_product(u[b]), atol=1e-12, rtol=0)
        torch.testing.assert_close(reflect(m[b], y[b], t[b], transpose=True), m[b] @ explicit_product(u[b]).T,
                                   atol=1e-12, rtol=0)
    torch.testing.assert_close(reflect(out, y, t, transpose=True), m, atol=1e-12, rtol=0)


@pytest.mark.parametrize("vectors", [unit_columns, gram_schmidt])
def test_zero_columns_reflect_nothing_with_finite_gradients(vectors):
    u = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    padded = torch.cat([u[:, :1], torch.zeros(6, 2, dtype=u.dtype), u[:, 1:]], dim=1).requires_grad_(True)
    y = vectors(padded)
    expected = explicit_product(gram_schmidt(u) if vectors is gram_schmidt else u)
    torch.testing.assert_close(dense(y, compact_wy(y)), expected, atol=1e-12, rtol=0)
    (grad,) = torch.autograd.grad(dense(y, compact_wy(y)).sum(), padded)
    assert torch.isfinite(grad).all()


def test_nan_vectors_stay_visible():
    u = torch.randn(5, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    u[0, 1] = float("nan")
    for vectors in (unit_columns, gram_schmidt):
        assert torch.isnan(vectors(u)[:, 1]).all()


def test_gram_schmidt_gives_the_product_of_reflections_in_orthonormal_vectors():
    u = torch.randn(8, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    q = gram_schmidt(u)
    torch.testing.assert_close(q.T @ q, torch.eye(3, dtype=u.dtype), atol=1e-12, rtol=0)
    # the same span, column by column (Gram-Schmidt keeps the order): q_i is u_i less its earlier parts
    for i in range(3):
        rest = u[:, i] - q[:, :i] @ (q[:, :i].T @ u[:, i])
        torch.testing.assert_close(q[:, i], rest / rest.norm(), atol=1e-12, rtol=0)
    h = dense(q, compact_wy(q))
    torch.testing.assert_close(h, torch.eye(8, dtype=u.dtype) - 2 * q @ q.T, atol=1e-12, rtol=0)
    torch.testing.assert_close(h, explicit_product(q), atol=1e-12, rtol=0)
    torch.testing.assert_close(h @ h.T, torch.eye(8, dtype=u.dtype), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_schmidt_drops_dependent_vectors_instead_of_dividing_by_zero(dtype):
    g = torch.Generator().manual_seed(3)
    half = torch.randn(5, 2, generator=g, dtype=dtype)
    u = half.repeat_interleave(2, dim=1)  # u_0 = u_1, u_2 = u_3 (HRA's symmetric initialisation)
    q = gram_schmidt(u)
    assert torch.isfinite(q).all()
    assert q[:, 1].abs().max() == 0 and q[:, 3].abs().max() == 0
    torch.testing.assert_close(q[:, [0, 2]], gram_schmidt(half), atol=1e-6, rtol=0)
    wide = gram_schmidt(torch.randn(3, 5, generator=g, dtype=dtype))  # r > d: only d directions exist
    assert torch.isfinite(wide).all() and (wide.norm(dim=0) > 0.5).sum() == 3


def test_gradients_match_the_explicit_product():
    u = torch.randn(6, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64, requires_grad=True)
    m = torch.randn(4, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for vectors in (unit_columns, gram_schmidt):
        y = vectors(u)
        (a,) = torch.autograd.grad(reflect(m, y, compact_wy(y)).square().sum(), u)
        (b,) = torch.autograd.grad((m @ explicit_product(vectors(u))).square().sum(), u)
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
