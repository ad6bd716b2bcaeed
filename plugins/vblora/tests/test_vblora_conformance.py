"""VB-LoRA runs the conformance suite (cross-loading against HF peft included) on the toy MLP, GPT-2
style ``Conv1D`` layers and tiny transformers, with and without ``save_only_topk_weights``."""

from peft_kernel_testing import ConformanceCase, conformance_suite
from peft_kernel_vblora import VBLoRAConfig


def vblora(**kwargs):
    return lambda: VBLoRAConfig(**{"r": 3, "num_vectors": 8, "vector_length": 2, **kwargs})


CASES = [
    ConformanceCase("mlp", vblora(target_modules=["lin0", "lin1", "lin2"])),
    ConformanceCase("mlp", vblora(target_modules="lin[01]", topk=3, num_vectors=5, r=2, modules_to_save=["lin2"],
                                  init_vector_bank_bound=0.5, init_logits_std=1.0), id="mlp-topk3-modules-to-save"),
    ConformanceCase("mlp", vblora(target_modules=["lin0", "lin1"], save_only_topk_weights=True), id="mlp-save-only-topk"),
    ConformanceCase("mlp", vblora(target_modules=["lin1", "lin2"], vector_length=4, topk=1, vblora_dropout=0.1),
                    id="mlp-topk1-dropout"),
    ConformanceCase("mlp", vblora(target_modules=["lin1"], bias="vblora_only"), id="mlp-bias-vblora-only",
                    changes_base_at_init=True),  # the perturbed bias is trained: disable is not the base
    ConformanceCase("gpt2-conv1d", vblora(target_modules=["c_fc", "c_proj"], fan_in_fan_out=True)),
    ConformanceCase("gpt2", vblora(vector_length=4, save_only_topk_weights=True, num_vectors=300)),
    ConformanceCase("llama", vblora(target_modules="all-linear", vector_length=4)),
    ConformanceCase("llama", vblora(vector_length=4), id="llama-defaults"),
    ConformanceCase("llama", vblora(target_modules=["q_proj", "down_proj"], vector_length=8, layers_to_transform=[1],
                                    layers_pattern="layers", exclude_modules=["model.layers.0.self_attn.q_proj"],
                                    bias="all"), id="llama-layers-bias-all"),
    ConformanceCase("opt", vblora(vector_length=8), id="opt-defaults"),  # HF's VB-LoRA defaults: all projections
    ConformanceCase("bert", vblora(task_type="SEQ_CLS", vector_length=4)),
]

TestVBLoRAConformance = conformance_suite(CASES)
