"""C3A runs the conformance suite (cross-loading with HF peft both ways) on toy and tiny transformers models."""

from peft_kernel_testing import ConformanceCase, conformance_suite
from peft_kernel_c3a import C3AConfig


def c3a(**kwargs):
    return lambda: C3AConfig(**{"block_size": 2, **kwargs})


CASES = [
    ConformanceCase("mlp", c3a(target_modules=["lin0", "lin1", "lin2"])),
    ConformanceCase("mlp", c3a(target_modules="lin[12]", block_size=4, block_size_pattern={"lin1": 8},
                               init_weights="kaiming_uniform", modules_to_save=["lin0"]),
                    id="mlp-regex-pattern-modules-to-save"),
    # bias="c3a_only"/"all" trains (and perturbs) the base biases, so disable/unload no longer give the base model
    ConformanceCase("mlp", c3a(target_modules=["lin1"], bias="c3a_only", init_weights="gaussian"),
                    id="mlp-bias-c3a-only", changes_base_at_init=True),
    ConformanceCase("llama", c3a(target_modules="all-linear", block_size=8)),
    ConformanceCase("llama", c3a(target_modules=["q_proj", "v_proj"], block_size=4, layers_to_transform=[1],
                                 init_weights=True), id="llama-layer-1-zero-init"),
    ConformanceCase("opt", c3a(block_size=8), id="opt-defaults"),
    ConformanceCase("bert", c3a(task_type="SEQ_CLS", block_size=8)),
    ConformanceCase("t5", c3a(target_modules=["q", "k", "v", "o", "wi", "wo"], block_size=8)),
]

TestC3AConformance = conformance_suite(CASES)
