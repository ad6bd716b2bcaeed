"""The dense delta W of FourierFT / WaveFT is cached across forwards and stays fresh."""

import pytest
import torch

from peft_kernel import FourierFTConfig, WaveFTConfig, get_peft_model, rescale_adapter_scale
from peft_kernel_testing import make_inputs, make_model, perturb, run
from peft_kernel_testing.freshness import check_cached_adapters_stay_fresh

pytest.importorskip("peft")

CONFIGS = {
    "fourierft": lambda: FourierFTConfig(target_modules=["q_proj", "v_proj", "down_proj"], n_frequency=40),
    "waveft": lambda: WaveFTConfig(target_modules=["q_proj", "v_proj", "down_proj"], n_frequency=40),
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_mixed_and_single_runs_equal_hf_after_in_place_writes(method):
    check_cached_adapters_stay_fresh("llama", CONFIGS[method])


def test_delta_is_built_once_across_forwards_and_rebuilt_on_a_scaling_change(monkeypatch):
    from peft_kernel_fourierft.layers import FourierFTLayer

    model = get_peft_model(make_model("llama"), CONFIGS["fourierft"]())
    perturb(model, 0)
    model.eval()
    calls = []
    original = FourierFTLayer.spectral_delta
    monkeypatch.setattr(FourierFTLayer, "spectral_delta", lambda self, name: calls.append(name) or original(self, name))
    layers = sum(isinstance(m, FourierFTLayer) for m in model.modules())
    first = run(model, make_inputs("llama"))
    assert len(calls) == layers
    assert torch.equal(run(model, make_inputs("llama")), first) and len(calls) == layers
    with rescale_adapter_scale(model, 0.0):
        base = run(model, make_inputs("llama"))
    with model.disable_adapter():
        torch.testing.assert_close(base, run(model, make_inputs("llama")), rtol=0, atol=1e-6)
    assert len(calls) == 2 * layers
    torch.testing.assert_close(run(model, make_inputs("llama")), first, rtol=0, atol=1e-6)
