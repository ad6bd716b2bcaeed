"""VeRA runs the conformance suite (cross-loading against HF peft included, with and without the
projections in the checkpoint) on the toy MLP, GPT-2 Conv1D layers and tiny transformers models."""

from peft_kernel_testing import ConformanceCase, conformance_suite
from peft_kernel_vera import VeraConfig


def vera(**kwargs):
    return lambda: VeraConfig(**{"r": 4, "init_weights": False, **kwargs})


CASES = [
    ConformanceCase("mlp", vera(target_modules=["lin0", "lin1", "lin2"])),
    ConformanceCase("mlp", vera(target_modules=["lin0", "lin2"], save_projection=False, projection_prng_key=7),
                    id="mlp-projection-not-saved"),
    ConformanceCase("mlp", vera(target_modules="lin[01]", r=3, d_initial=0.5, init_weights=True, modules_to_save=["lin2"]),
                    id="mlp-default-init-modules-to-save"),
    ConformanceCase("mlp", vera(target_modules=["lin1"], bias="vera_only"), id="mlp-bias-vera-only", changes_base_at_init=True),
    ConformanceCase("gpt2-conv1d", vera(target_modules=["c_fc", "c_proj"], fan_in_fan_out=True)),
    ConformanceCase("llama", vera(target_modules=["q_proj", "k_proj", "down_proj"])),
    ConformanceCase("llama", vera(target_modules="all-linear", save_projection=False), id="llama-all-linear-not-saved"),
    ConformanceCase("gpt2", vera(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    ConformanceCase("bert", vera(task_type="SEQ_CLS", target_modules=["query", "value"])),
]

TestVeraConformance = conformance_suite(CASES)
