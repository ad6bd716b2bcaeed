"""WaveFT runs the conformance suite (HF cross-loading both ways included) on the toy MLP, GPT-2
``Conv1D`` layers and tiny transformers models, with several wavelet families and options."""

import pytest

from peft_kernel_testing import ConformanceCase, conformance_suite
from peft_kernel_waveft import WaveFTConfig

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to:UserWarning")


def waveft(**kwargs):
    """Zero-initialised coefficients (HF's default), which the suite perturbs; few of them, for the toys;
    ``scaling=1``: with HF's 25 the perturbed toys' outputs reach the hundreds, where float32 rounding
    alone exceeds the suite's absolute tolerances."""
    return lambda: WaveFTConfig(**{"n_frequency": 24, "scaling": 1.0, **kwargs})


CASES = [
    ConformanceCase("mlp", waveft(target_modules=["lin0", "lin1", "lin2"])),
    ConformanceCase("mlp", waveft(target_modules=["lin0", "lin1"], wavelet_family="db3", n_frequency_pattern={"lin1": 96}, scaling=3.0,
                                  init_weights=False, random_loc_seed=12345, modules_to_save=["lin2"]), id="mlp-db3-pattern-seed"),
    ConformanceCase("mlp", waveft(target_modules="lin[01]", wavelet_family="sym4", bias="waveft_only"), id="mlp-sym4-regex-bias",
                    changes_base_at_init=True),
    ConformanceCase("mlp", waveft(target_modules=["lin0", "lin1", "lin2"], wavelet_family="coif2", proportional_parameters=True,
                                  n_frequency=10), id="mlp-coif2-proportional"),
    ConformanceCase("mlp", waveft(target_modules=["lin0", "lin1"], use_idwt=False, scaling=2.0), id="mlp-no-idwt"),
    ConformanceCase("gpt2-conv1d", waveft(target_modules=["c_fc", "c_proj"], wavelet_family="db2")),
    ConformanceCase("gpt2", waveft(n_frequency=40)),
    ConformanceCase("llama", waveft(target_modules=["q_proj", "v_proj", "down_proj"], wavelet_family="sym2")),
    ConformanceCase("bert", waveft(task_type="SEQ_CLS", target_modules=["query", "value"], wavelet_family="db5")),
]

TestWaveFTConformance = conformance_suite(CASES)
