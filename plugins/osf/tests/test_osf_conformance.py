"""OSF runs the conformance suite (cross-loading against HF peft included) on the toy MLP and tiny
transformers models."""

from peft_kernel_testing import ConformanceCase, conformance_suite
from peft_kernel_osf import OSFConfig


def osf(**kwargs):
    return lambda: OSFConfig(**kwargs)


CASES = [
    ConformanceCase("mlp", osf(target_modules=["lin0", "lin1", "lin2"])),
    ConformanceCase("mlp", osf(), id="mlp-default-targets"),
    ConformanceCase("mlp", osf(target_modules="lin[01]", effective_rank=0.3, rank_pattern={"in1": 12},
                               modules_to_save=["lin2"]), id="mlp-fraction-pattern-modules-to-save"),
    ConformanceCase("mlp", osf(target_modules=["lin0", "lin1"], effective_rank=3, init_weights=False, ),
                    id="mlp-random-init", perturb=False),
    ConformanceCase("llama", osf(target_modules=["q_proj", "v_proj", "down_proj"], effective_rank=4)),
    ConformanceCase("llama", osf(), id="llama-defaults"),
    ConformanceCase("bert", osf(task_type="SEQ_CLS")),
    ConformanceCase("t5", osf(effective_rank=0.75), id="t5-all-linear-fraction"),
]

TestOSFConformance = conformance_suite(CASES)
