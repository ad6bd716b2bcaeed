"""LN tuning runs the conformance suite (cross-loading against HF peft included) on tiny
transformers models' norm layers, and on other module types (any module can be tuned)."""

from peft_kernel_testing import ConformanceCase, conformance_suite
from peft_kernel_ln_tuning import LNTuningConfig


def ln(**kwargs):
    return lambda: LNTuningConfig(**kwargs)


CASES = [
    ConformanceCase("llama", ln(), id="llama-defaults"),
    ConformanceCase("gpt2", ln(), id="gpt2-defaults"),
    ConformanceCase("t5", ln(), id="t5-defaults"),
    ConformanceCase("bert", ln(task_type="SEQ_CLS", target_modules=["LayerNorm"])),
    ConformanceCase("llama", ln(target_modules=["norm", "down_proj"], exclude_modules=["layers.0.mlp.down_proj"]),
                    id="llama-norm-and-linear"),
    ConformanceCase("mlp", ln(target_modules=["lin1"], modules_to_save=["lin2"]), id="mlp-linear-modules-to-save"),
]

TestLNTuningConformance = conformance_suite(CASES)
