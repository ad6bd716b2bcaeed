"""Testing support for peft-kernel and its plugins: the conformance suite, tiny models, fixtures."""

from peft_kernel_testing.conformance import CHECKS, ConformanceCase, conformance_suite
from peft_kernel_testing.generation import check_generate_matches_greedy, greedy_decode
from peft_kernel_testing.hf_oracle import check_mixed_batch_against_hf, hf_oracle, max_abs_diff, perturb, run
from peft_kernel_testing.models import MODELS, make_inputs, make_model, output_tensor

__all__ = [
    "CHECKS", "ConformanceCase", "MODELS", "check_generate_matches_greedy", "check_mixed_batch_against_hf",
    "conformance_suite", "greedy_decode", "hf_oracle", "make_inputs", "make_model", "max_abs_diff", "output_tensor",
    "perturb", "run",
]
