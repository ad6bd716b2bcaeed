"""Incremental PCA of a layer's inputs for EVA: the batch-wise update of the leading right-singular
vectors of the centred data (Ross et al.'s incremental SVD with a running mean, as in scikit-learn's
``IncrementalPCA``), computed with ``torch.svd_lowrank`` (``q = 2k``, 4 power iterations, seed 42 per
step, so results are reproducible and independent of the global RNG)."""

from __future__ import annotations

import torch

LOWRANK_SEED = 42
LOWRANK_NITER = 4


class IncrementalPCA:
    """The ``n_components`` leading principal directions of all rows seen so far (approximately:
    each step keeps only ``n_components`` directions of the past)."""

    def __init__(self, n_components: int) -> None:
        self.n_components = n_components
        self.n_seen = 0
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None
        self.components: torch.Tensor | None = None
        self.previous: torch.Tensor | None = None
        self.singular_values: torch.Tensor | None = None
        self.explained_variance_ratio: torch.Tensor | None = None

    def update(self, rows: torch.Tensor) -> None:
        """Fold ``rows`` ([n, features], ``n >= n_components``) into the decomposition."""
        count = rows.shape[0]
        batch_mean = rows.mean(0)
        batch_mean64 = rows.double().mean(0)
        batch_var = rows.double().var(0, unbiased=False)
        if self.n_seen == 0:
            total, mean, var = count, batch_mean64, batch_var
            stacked = rows - batch_mean
        else:
            # the running statistics are float64, so from the second batch on the SVD is too
            total = self.n_seen + count
            mean = (self.n_seen * self.mean + count * batch_mean64) / total
            var = (self.n_seen * self.var + count * batch_var
                   + self.n_seen * count / total * (self.mean - batch_mean64) ** 2) / total
            correction = ((self.n_seen / total) * count) ** 0.5 * (self.mean - batch_mean)
            stacked = torch.cat([(self.singular_values[:, None] * self.components).double(),
                                 (rows - batch_mean).double(), correction[None]])
        singular, right_h = _svd(stacked, self.n_components)
        self.previous = self.components
        self.components = right_h[: self.n_components]
        self.singular_values = singular[: self.n_components]
        self.n_seen, self.mean, self.var = total, mean, var
        self.explained_variance_ratio = self.singular_values**2 / (var * total).sum()

    def stable_directions(self, tau: float) -> torch.Tensor:
        """Per direction: whether it moved less than ``tau`` (cosine) in the last update."""
        if self.previous is None:
            return torch.zeros(self.n_components, dtype=torch.bool)
        return ((self.components * self.previous).sum(1) >= tau).cpu()


def _svd(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values and right-singular vectors (rows) of ``matrix`` by a seeded randomised SVD,
    each vector's sign fixed so that its largest-magnitude entry is positive."""
    with torch.random.fork_rng(devices=[matrix.device] if matrix.device.type == "cuda" else []):
        torch.manual_seed(LOWRANK_SEED)
        _, singular, right = torch.svd_lowrank(matrix, q=min(2 * k, *matrix.shape), niter=LOWRANK_NITER)
    right_h = right.mT
    largest = right_h.abs().argmax(1)
    signs = torch.sign(right_h[torch.arange(right_h.shape[0], device=right_h.device), largest])
    return singular, right_h * signs[:, None]
