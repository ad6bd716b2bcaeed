"""OFT's rotation blocks are computed once per adapter and reused across forwards outside
training; mixed batches and single runs stay equal to HF peft after in-place writes."""

import pytest
import torch

from peft_kernel import OFTConfig, get_peft_model
from peft_kernel_testing import make_inputs, make_model, perturb, run
from peft_kernel_testing.freshness import check_cached_adapters_stay_fresh
from peft_kernel_oft.rotation import OFTRotationModule

pytest.importorskip("peft")


@pytest.mark.parametrize("kwargs", [dict(oft_block_size=4), dict(r=2, oft_block_size=0, use_cayley_neumann=False)])
def test_mixed_and_single_runs_equal_hf_after_in_place_writes(kwargs):
    check_cached_adapters_stay_fresh("llama", lambda: OFTConfig(target_modules=["q_proj", "v_proj", "down_proj"],
                                                                init_weights=False, **kwargs))


def test_blocks_are_computed_once_outside_training_and_every_call_in_training(monkeypatch):
    model = get_peft_model(make_model("llama"), OFTConfig(target_modules=["q_proj"], oft_block_size=4))
    perturb(model, 0)
    calls = []
    original = OFTRotationModule.blocks
    monkeypatch.setattr(OFTRotationModule, "blocks", lambda self, *a: calls.append(1) or original(self, *a))
    model.eval()
    first = run(model, make_inputs("llama"))
    count = len(calls)
    assert count > 0 and torch.equal(run(model, make_inputs("llama")), first) and len(calls) == count
    model.train()
    model(**make_inputs("llama"))
    assert len(calls) == 2 * count
