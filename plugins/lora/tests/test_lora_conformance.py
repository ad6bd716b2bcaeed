"""LoRA runs the conformance suite on toy models and tiny transformers models."""

from peft_kernel_testing import ConformanceCase, conformance_suite
from peft_kernel_lora import LoraConfig


def lora(**kwargs):
    return lambda: LoraConfig(**{"r": 4, "lora_alpha": 8, **kwargs})


CASES = [
    ConformanceCase("mlp", lora(target_modules=["lin0", "lin1"])),
    ConformanceCase("mlp", lora(target_modules=["lin0", "lin1"], use_dora=True), id="mlp-dora"),
    ConformanceCase("mlp", lora(target_modules=["lin0", "lin1", "lin2"], use_rslora=True, lora_bias=True,
                                rank_pattern={"lin1": 2}, alpha_pattern={"lin2": 3}), id="mlp-rslora-bias-patterns"),
    ConformanceCase("mlp", lora(target_modules="lin[01]", modules_to_save=["lin2"]), id="mlp-regex-modules-to-save"),
    ConformanceCase("mlp", lora(target_modules=["lin0", "lin1"], init_lora_weights="pissa"), id="mlp-pissa",
                    changes_base_at_init=True),
    ConformanceCase("mlp", lora(target_modules=["lin0", "lin1"], init_lora_weights="olora"), id="mlp-olora",
                    changes_base_at_init=True),
    ConformanceCase("mlp", lora(target_modules=["lin0"], init_lora_weights="gaussian", lora_dropout=0.1), id="mlp-gaussian-dropout"),
    # bias="all"/"lora_only" train base biases too, so disable/unload no longer give the base model
    ConformanceCase("mlp", lora(target_modules=["lin0", "lin1"], bias="all"), id="mlp-bias-all", changes_base_at_init=True),
    ConformanceCase("conv2d", lora(target_modules=["conv0"], bias="lora_only"), id="conv2d-bias-lora-only", changes_base_at_init=True),
    ConformanceCase("conv1d", lora(target_modules=["conv0", "conv1"])),
    ConformanceCase("conv2d", lora(target_modules=["conv0", "conv1", "lin"])),
    ConformanceCase("conv2d", lora(target_modules=["conv0", "conv1"], use_dora=True), id="conv2d-dora"),
    ConformanceCase("conv3d", lora(target_modules=["conv0", "conv1"])),
    ConformanceCase("embedding", lora(target_modules=["emb", "lin"])),
    ConformanceCase("embedding", lora(target_modules=["emb"], use_dora=True), id="embedding-dora"),
    ConformanceCase("gpt2-conv1d", lora(target_modules=["c_fc", "c_proj"])),
    ConformanceCase("gpt2-conv1d", lora(target_modules=["c_fc", "c_proj"], use_dora=True), id="gpt2-conv1d-dora"),
    ConformanceCase("llama", lora(target_modules="all-linear")),
    ConformanceCase("llama", lora(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers"),
                    id="llama-layers-to-transform"),
    ConformanceCase("mistral", lora(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_dora=True), id="mistral-dora"),
    ConformanceCase("gpt2", lora(target_modules=["c_attn", "c_proj"], exclude_modules=["lm_head"])),
    ConformanceCase("opt", lora()),
    ConformanceCase("bert", lora(task_type="SEQ_CLS")),
    ConformanceCase("t5", lora(target_modules=["q", "k", "v", "o", "wi", "wo"])),
]

TestLoraConformance = conformance_suite(CASES)
