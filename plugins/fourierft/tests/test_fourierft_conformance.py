"""FourierFT runs the conformance suite (HF cross-loading both ways included) on the toy MLP, GPT-2
``Conv1D`` layers and tiny transformers models."""

import pytest

from peft_kernel_testing import ConformanceCase, conformance_suite
from peft_kernel_fourierft import FourierFTConfig

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")


def fourierft(**kwargs):
    """Zero-initialised spectra, which the suite perturbs: with HF's default ``init_weights=False``
    (standard normal spectra) times ``scaling=150`` the toy outputs reach the thousands, where float32
    rounding alone exceeds the suite's absolute tolerances."""
    return lambda: FourierFTConfig(**{"n_frequency": 24, "init_weights": True, **kwargs})


CASES = [
    ConformanceCase("mlp", fourierft(target_modules=["lin0", "lin1", "lin2"])),
    ConformanceCase("mlp", fourierft(target_modules=["lin0", "lin1"], n_frequency_pattern={"lin1": 256}, scaling=10.0, init_weights=False,
                                     random_loc_seed=12345, modules_to_save=["lin2"]), id="mlp-pattern-full-spectrum-seed"),
    ConformanceCase("mlp", fourierft(target_modules="lin[01]", bias="fourier_only"), id="mlp-regex-bias-fourier-only",
                    changes_base_at_init=True),
    ConformanceCase("gpt2-conv1d", fourierft(target_modules=["c_fc", "c_proj"])),
    ConformanceCase("gpt2", fourierft(n_frequency=40)),
    ConformanceCase("llama", fourierft(target_modules=["q_proj", "v_proj", "down_proj"])),
    ConformanceCase("bert", fourierft(task_type="SEQ_CLS", target_modules=["query", "value"])),
]

TestFourierFTConformance = conformance_suite(CASES)
