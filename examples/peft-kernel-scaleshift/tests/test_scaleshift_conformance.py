"""ScaleShift runs the core conformance suite. There is no HF PEFT counterpart, so ``hf=False``
skips (visibly) the two cross-loading checks; every other check runs."""

from peft_kernel_testing import ConformanceCase, conformance_suite
from peft_kernel_scaleshift import ScaleShiftConfig


def scaleshift(**kwargs):
    return lambda: ScaleShiftConfig(**kwargs)


TestScaleShiftConformance = conformance_suite([
    ConformanceCase("mlp", scaleshift(target_modules=["lin0", "lin1"]), hf=False),
    ConformanceCase("mlp", scaleshift(target_modules="lin[01]", modules_to_save=["lin2"]), id="mlp-regex-modules-to-save",
                    hf=False),
    ConformanceCase("llama", scaleshift(target_modules=["q_proj", "v_proj", "down_proj"]), hf=False),
])
