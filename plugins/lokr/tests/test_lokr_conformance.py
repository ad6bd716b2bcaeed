"""LoKr runs the conformance suite on toy models and tiny transformers models."""

from peft_kernel_testing import ConformanceCase, conformance_suite
from peft_kernel_lokr import LoKrConfig


def lokr(**kwargs):
    return lambda: LoKrConfig(**{"r": 4, "alpha": 8, **kwargs})


CASES = [
    ConformanceCase("mlp", lokr(target_modules=["lin0", "lin1", "lin2"])),
    ConformanceCase("mlp", lokr(target_modules=["lin0", "lin1", "lin2"], r=1, decompose_both=True, init_weights="lycoris",
                                rank_pattern={"lin2": 2}, alpha_pattern={"lin1": 3}), id="mlp-decompose-both-lycoris-patterns"),
    ConformanceCase("mlp", lokr(target_modules="lin[01]", r=2, decompose_factor=2, modules_to_save=["lin2"], init_weights=False,
                                rank_dropout=0.3, module_dropout=0.2, rank_dropout_scale=True),
                    id="mlp-factor-random-dropouts-modules-to-save"),
    ConformanceCase("conv1d", lokr(target_modules=["conv0", "conv1"])),
    ConformanceCase("conv1d", lokr(target_modules=["conv0"], r=1, use_effective_conv2d=True), id="conv1d-effective"),
    # HF PEFT 0.21.2 itself fails here (torch.kron on a non-contiguous view), so there is nothing to cross-load
    ConformanceCase("conv1d", lokr(target_modules=["conv0", "conv1"], r=1, use_effective_conv2d=True),
                    id="conv1d-effective-beyond-hf", hf=False),
    ConformanceCase("conv2d", lokr(target_modules=["conv0", "conv1", "lin"])),
    ConformanceCase("conv2d", lokr(target_modules=["conv0", "conv1", "lin"], r=1), id="conv2d-decomposed"),
    ConformanceCase("conv2d", lokr(target_modules=["conv0", "conv1"], r=1, use_effective_conv2d=True, decompose_both=True),
                    id="conv2d-effective"),
    ConformanceCase("llama", lokr(target_modules=["q_proj", "v_proj", "down_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"])),
    ConformanceCase("llama", lokr(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers"),
                    id="llama-layers-to-transform"),
    ConformanceCase("bert", lokr(task_type="SEQ_CLS")),
]

TestLoKrConformance = conformance_suite(CASES)
