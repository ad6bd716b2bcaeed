"""BOFT runs the conformance suite on toy models and tiny transformers models, several block layouts.

HF PEFT is the oracle of multi-factor adapters only with its ``fbd_cuda`` extension; the imported
``hf_fbd_standin`` fixture gives it a pure-torch stand-in for the duration of each test.
"""

from boft_hf_standin import hf_fbd_standin  # noqa: F401  (autouse fixture: HF's extension, per test)
from peft_kernel_testing import ConformanceCase, conformance_suite
from peft_kernel_boft import BOFTConfig


def boft(**kwargs):
    return lambda: BOFTConfig(**kwargs)


CASES = [
    ConformanceCase("mlp", boft(target_modules=["lin0", "lin1", "lin2"], boft_block_size=2)),
    ConformanceCase("mlp", boft(target_modules=["lin1", "lin2"], boft_block_size=4, boft_n_butterfly_factor=2),
                    id="mlp-size4-factor2"),
    ConformanceCase("mlp", boft(target_modules=["lin1", "lin2"], boft_block_size=2, boft_n_butterfly_factor=4,
                                init_weights=False), id="mlp-size2-factor4-random-init"),
    ConformanceCase("mlp", boft(target_modules="lin[12]", boft_block_size=0, boft_block_num=2, boft_n_butterfly_factor=2,
                                boft_dropout=0.25, modules_to_save=["lin0"]), id="mlp-num2-factor2-dropout-regex"),
    # bias="boft_only" trains (and perturbs) the base biases, so disable/unload no longer give the base model
    ConformanceCase("mlp", boft(target_modules=["lin1"], bias="boft_only"), id="mlp-bias-boft-only",
                    changes_base_at_init=True),
    ConformanceCase("conv2d", boft(target_modules=["conv0", "conv1", "lin"], boft_block_size=3)),
    ConformanceCase("llama", boft(target_modules="all-linear", boft_block_size=4, boft_n_butterfly_factor=2)),
    ConformanceCase("bert", boft(task_type="SEQ_CLS", boft_block_size=2, boft_n_butterfly_factor=3)),
]

TestBOFTConformance = conformance_suite(CASES)
