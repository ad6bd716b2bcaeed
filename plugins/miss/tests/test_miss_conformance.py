"""MiSS runs the conformance suite (cross-loading with HF PEFT both ways) in each of its variants."""

from peft_kernel_testing import ConformanceCase, conformance_suite
from peft_kernel_miss import MissConfig


def miss(**kwargs):
    return lambda: MissConfig(**{"r": 4, **kwargs})


CASES = [
    ConformanceCase("mlp", miss(target_modules=["lin0", "lin1", "lin2"])),  # lin0: in 10 is no multiple of r
    ConformanceCase("mlp", miss(target_modules=["lin1", "lin2"], init_weights=False, miss_dropout=0.1,
                                modules_to_save=["lin0"]), id="mlp-random-dropout-modules-to-save"),
    ConformanceCase("mlp", miss(target_modules="lin[12]", init_weights="mini", mini_r=2), id="mlp-mini"),
    ConformanceCase("mlp", miss(target_modules=["lin1"], init_weights="bat"), id="mlp-bat"),
    ConformanceCase("mlp", miss(target_modules=["lin1"], bias="miss_only"), id="mlp-bias-miss-only",
                    changes_base_at_init=True),
    ConformanceCase("llama", miss()),
    ConformanceCase("llama", miss(target_modules="all-linear", init_weights="bat"), id="llama-bat"),
    ConformanceCase("llama", miss(target_modules=["q_proj", "down_proj"], init_weights="mini", mini_r=4),
                    id="llama-mini"),
    ConformanceCase("bert", miss(task_type="SEQ_CLS")),
]

TestMissConformance = conformance_suite(CASES)
