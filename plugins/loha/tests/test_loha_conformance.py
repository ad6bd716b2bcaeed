"""LoHa runs the conformance suite on toy models and tiny transformers models."""

from peft_kernel_testing import ConformanceCase, conformance_suite
from peft_kernel_loha import LoHaConfig


def loha(**kwargs):
    return lambda: LoHaConfig(**{"r": 4, "alpha": 8, **kwargs})


CASES = [
    ConformanceCase("mlp", loha(target_modules=["lin0", "lin1"])),
    ConformanceCase("mlp", loha(target_modules=["lin0", "lin1", "lin2"], rank_pattern={"lin1": 2}, alpha_pattern={"lin2": 3},
                                init_weights=False), id="mlp-patterns-random-init"),
    ConformanceCase("mlp", loha(target_modules="lin[01]", modules_to_save=["lin2"], rank_dropout=0.3, module_dropout=0.2),
                    id="mlp-regex-dropouts-modules-to-save"),
    ConformanceCase("conv1d", loha(target_modules=["conv0", "conv1"])),
    ConformanceCase("conv1d", loha(target_modules=["conv0", "conv1"], use_effective_conv2d=True), id="conv1d-effective"),
    ConformanceCase("conv2d", loha(target_modules=["conv0", "conv1", "lin"])),
    ConformanceCase("conv2d", loha(target_modules=["conv0", "conv1", "lin"], use_effective_conv2d=True), id="conv2d-effective"),
    ConformanceCase("llama", loha(target_modules=["q_proj", "v_proj", "down_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"])),
    ConformanceCase("llama", loha(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers"),
                    id="llama-layers-to-transform"),
    ConformanceCase("bert", loha(task_type="SEQ_CLS")),
]

TestLoHaConformance = conformance_suite(CASES)
