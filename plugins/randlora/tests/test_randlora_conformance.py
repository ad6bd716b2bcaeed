"""RandLora runs the conformance suite (cross-loading against HF peft included, with and without the
bases in the checkpoint, dense and ternary bases) on the toy MLP, GPT-2 Conv1D layers and tiny
transformers models."""

from peft_kernel_testing import ConformanceCase, conformance_suite
from peft_kernel_randlora import RandLoraConfig


def randlora(**kwargs):
    return lambda: RandLoraConfig(**{"r": 4, "randlora_alpha": 2, **kwargs})


CASES = [
    ConformanceCase("mlp", randlora(target_modules=["lin0", "lin1", "lin2"])),
    ConformanceCase("mlp", randlora(target_modules=["lin0", "lin2"], r=3, save_projection=False, projection_prng_key=7),
                    id="mlp-bases-not-saved"),
    ConformanceCase("mlp", randlora(target_modules="lin[01]", sparse=True, init_weights=False, modules_to_save=["lin2"]),
                    id="mlp-sparse-random-init-modules-to-save"),
    ConformanceCase("mlp", randlora(target_modules=["lin1"], bias="randlora_only", very_sparse=True),
                    id="mlp-very-sparse-bias-randlora-only", changes_base_at_init=True),
    ConformanceCase("gpt2-conv1d", randlora(target_modules=["c_fc", "c_proj"], fan_in_fan_out=True)),
    ConformanceCase("llama", randlora(target_modules=["q_proj", "k_proj", "down_proj"], r=3)),
    ConformanceCase("llama", randlora(target_modules="all-linear", save_projection=False), id="llama-all-linear-not-saved"),
    ConformanceCase("gpt2", randlora(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    ConformanceCase("bert", randlora(task_type="SEQ_CLS", target_modules=["query", "value"])),
]

TestRandLoraConformance = conformance_suite(CASES)
