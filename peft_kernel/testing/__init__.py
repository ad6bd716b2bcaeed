"""Testing support for peft-kernel and its plugins: the conformance suite, tiny models, fixtures."""

from peft_kernel.testing.conformance import CHECKS, ConformanceCase, conformance_suite
from peft_kernel.testing.hf_oracle import check_mixed_batch_against_hf, max_abs_diff, perturb, run
from peft_kernel.testing.models import MODELS, make_inputs, make_model, output_tensor

__all__ = [
    "CHECKS", "ConformanceCase", "MODELS", "check_mixed_batch_against_hf", "conformance_suite", "make_inputs",
    "make_model", "max_abs_diff", "output_tensor", "perturb", "run",
]
