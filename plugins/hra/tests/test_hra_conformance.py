"""HRA runs the conformance suite (cross-loading against HF peft included) on the toy MLP, a
Conv2d model and tiny transformers models: Gram-Schmidt on and off, even and odd ``r``."""

import pytest

from peft_kernel_hra import HRAConfig
from peft_kernel_testing import ConformanceCase, conformance_suite

pytestmark = pytest.mark.filterwarnings("ignore:The symmetric initialization:UserWarning",
                                        "ignore:.*Gram-Schmidt:UserWarning", "ignore:Careful, disabling adapter layers")


def hra(**kwargs):
    return lambda: HRAConfig(**{"r": 4, **kwargs})


CASES = [
    ConformanceCase("mlp", hra(target_modules=["lin0", "lin1", "lin2"])),
    ConformanceCase("mlp", hra(target_modules=["lin0", "lin1"], r=3, init_weights=False), id="mlp-odd-r"),
    ConformanceCase("mlp", hra(target_modules="lin[01]", r=3, apply_GS=True, modules_to_save=["lin2"]),
                    id="mlp-gs-odd-r-regex-modules-to-save"),
    ConformanceCase("mlp", hra(target_modules=["lin1"], apply_GS=True, init_weights=False), id="mlp-gs-even-r"),
    ConformanceCase("mlp", hra(target_modules=["lin1"], bias="hra_only"), id="mlp-bias-hra-only",
                    changes_base_at_init=True),
    ConformanceCase("conv2d", hra(target_modules=["conv0", "conv1", "lin"], r=5, init_weights=False)),
    ConformanceCase("conv2d", hra(target_modules=["conv0", "conv1"], r=2, apply_GS=True, init_weights=False),
                    id="conv2d-gs"),
    ConformanceCase("llama", hra(target_modules="all-linear")),
    ConformanceCase("llama", hra(), id="llama-defaults"),
    ConformanceCase("bert", hra(task_type="SEQ_CLS", apply_GS=True, init_weights=False)),
]

TestHRAConformance = conformance_suite(CASES)
