"""A pure-torch stand-in for HF PEFT's ``fbd_cuda`` extension, for the tests' HF oracle only.

Without its CUDA extension HF PEFT 0.21.2 silently builds every BOFT layer with ONE butterfly factor,
whatever ``boft_n_butterfly_factor`` says (it warns "Setting boft_n_butterfly_factor to 1"), so it
cannot serve as the oracle of multi-factor adapters. Importing this module into a test module gives
that module the autouse fixture below: HF sees a block-diagonal builder written in plain torch, for
the duration of each test only (``monkeypatch`` restores HF's state after it), so no other test in
the same pytest process is affected.
"""

from __future__ import annotations

from typing import Iterator

import pytest
import torch


class BlockDiagStandIn:
    """The two calls HF makes of the extension: block-diagonal assembly and its gradient."""

    @staticmethod
    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        """``blocks[m, D, b, b]`` -> ``[m, D * b, D * b]`` block-diagonal matrices."""
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]

    @staticmethod
    def backward(grad: torch.Tensor, blocks: torch.Tensor) -> list[torch.Tensor]:
        """The gradient of :meth:`forward`: ``grad``'s diagonal blocks ``[m, D, b, b]``."""
        m, num, b, _ = blocks.shape
        tiles = grad.reshape(m, num, b, num, b)
        index = torch.arange(num, device=grad.device)
        return [tiles[:, index, :, index, :].permute(1, 0, 2, 3).contiguous()]


@pytest.fixture(autouse=True)
def hf_fbd_standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """HF PEFT's BOFT uses :class:`BlockDiagStandIn` as its ``fbd_cuda`` during one test."""
    hf_layer = pytest.importorskip("peft.tuners.boft.layer")
    monkeypatch.setattr(hf_layer, "_FBD_CUDA", BlockDiagStandIn())
    yield
