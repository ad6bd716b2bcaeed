"""C3A's kernel spectra are computed once per adapter and reused across forwards; mixed batches
(one input FFT, one inverse FFT for the whole batch) and single runs equal HF peft after in-place
writes."""

import pytest

from peft_kernel import C3AConfig
from peft_kernel_testing.freshness import check_cached_adapters_stay_fresh

pytest.importorskip("peft")


@pytest.mark.parametrize("names", [("b", "__base__", "a", "b"), ("a", "a", "b", "b")])
def test_mixed_and_single_runs_equal_hf_after_in_place_writes(names):
    check_cached_adapters_stay_fresh(
        "llama", lambda: C3AConfig(target_modules=["q_proj", "v_proj", "down_proj"], block_size=4,
                                   init_weights=False), names=names)
