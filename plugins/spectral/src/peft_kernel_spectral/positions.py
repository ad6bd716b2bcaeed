"""The seeded coefficient positions of FourierFT and WaveFT (HF PEFT draws them the same way)."""

from __future__ import annotations

import torch


def seeded_positions(seed: int, rows: int, cols: int, count: int) -> torch.Tensor:
    """The ``[2, count]`` (row, column) positions of the learned coefficients in a ``[rows, cols]``
    coefficient matrix: the first ``count`` entries of a random permutation of the flattened
    positions, drawn from a CPU generator seeded with ``seed``. HF PEFT draws the same, so the
    positions, which are never saved, are rebuilt bit-identically when an adapter is loaded."""
    generator = torch.Generator().manual_seed(seed)
    flat = torch.randperm(rows * cols, generator=generator)[:count]
    return torch.stack([flat // cols, flat % cols])
