"""IA3 runs the conformance suite on toy models and tiny transformers models."""

from peft_kernel_testing import ConformanceCase, conformance_suite
from peft_kernel_ia3 import IA3Config


def ia3(**kwargs):
    return lambda: IA3Config(**kwargs)


CASES = [
    ConformanceCase("mlp", ia3(target_modules=["lin0", "lin1", "lin2"], feedforward_modules=["lin1"])),
    ConformanceCase("mlp", ia3(target_modules="lin[01]", feedforward_modules="lin0", modules_to_save=["lin2"]),
                    id="mlp-regex-modules-to-save"),
    ConformanceCase("conv2d", ia3(target_modules=["conv0", "conv1", "lin"], feedforward_modules=["conv1"])),
    ConformanceCase("conv3d", ia3(target_modules=["conv0", "conv1"], feedforward_modules=["conv0"])),
    ConformanceCase("conv1d", ia3(target_modules=["conv0", "conv1"], feedforward_modules=["conv1"]), hf=False),
    ConformanceCase("gpt2-conv1d", ia3(target_modules=["c_fc", "c_proj"], feedforward_modules=["c_proj"])),
    ConformanceCase("llama", ia3()),
    ConformanceCase("gpt2", ia3(), id="gpt2-defaults"),
    ConformanceCase("bert", ia3(task_type="SEQ_CLS")),
    ConformanceCase("t5", ia3(target_modules=["q", "k", "v", "o", "wi", "wo"], feedforward_modules=["wo", "wi"])),
]

TestIA3Conformance = conformance_suite(CASES)
