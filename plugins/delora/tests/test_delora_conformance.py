"""DeLoRA runs the conformance suite (cross-loading against HF peft included) on the toy MLP and
tiny transformers models."""

from peft_kernel_testing import ConformanceCase, conformance_suite
from peft_kernel_delora import DeloraConfig


def delora(**kwargs):
    return lambda: DeloraConfig(**{"r": 4, "init_weights": False, **kwargs})


CASES = [
    ConformanceCase("mlp", delora(target_modules=["lin0", "lin1", "lin2"])),
    ConformanceCase("mlp", delora(target_modules="lin[01]", rank_pattern={"lin1": 2}, lambda_pattern={"lin0": 3.5},
                                  delora_lambda=7, modules_to_save=["lin2"]), id="mlp-patterns-modules-to-save"),
    ConformanceCase("mlp", delora(target_modules=["lin0", "lin1"], init_weights=True), id="mlp-default-init"),
    ConformanceCase("mlp", delora(target_modules=["lin1"], bias="delora_only"), id="mlp-bias-delora-only",
                    changes_base_at_init=True),
    ConformanceCase("llama", delora(target_modules="all-linear")),
    ConformanceCase("llama", delora(), id="llama-defaults"),
    ConformanceCase("bert", delora(task_type="SEQ_CLS")),
]

TestDeloraConformance = conformance_suite(CASES)
