"""The seeded positions: distinct, in range, reproducible, and a prefix of one permutation."""

import torch

from peft_kernel_spectral import seeded_positions


def test_positions_are_distinct_in_range_and_reproducible():
    positions = seeded_positions(777, 16, 10, 160)
    rows, cols = positions
    assert positions.shape == (2, 160) and positions.dtype == torch.int64
    assert rows.max() < 16 and cols.max() < 10
    assert len(set(zip(rows.tolist(), cols.tolist()))) == 160
    assert torch.equal(positions, seeded_positions(777, 16, 10, 160))


def test_fewer_positions_are_a_prefix_and_another_seed_draws_others():
    assert torch.equal(seeded_positions(3, 7, 5, 12), seeded_positions(3, 7, 5, 35)[:, :12])
    assert not torch.equal(seeded_positions(3, 7, 5, 35), seeded_positions(4, 7, 5, 35))


def test_the_positions_are_the_seeded_permutation_row_major():
    flat = torch.randperm(6 * 4, generator=torch.Generator().manual_seed(-5))[:9]
    assert torch.equal(seeded_positions(-5, 6, 4, 9), torch.stack([flat // 4, flat % 4]))
