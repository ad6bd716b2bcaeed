"""AdaLoRA runs the conformance suite (cross-loading against HF peft included) on the toy MLP, a
convolutional net, tiny llama, GPT-2 (``Conv1D``) and BERT for sequence classification. AdaLoRA
allows one trainable adapter (as HF PEFT): the suite's extra adapters are in ``inference_mode``."""

from peft_kernel_testing import ConformanceCase, conformance_suite
from peft_kernel_adalora import AdaLoraConfig


def adalora(**kwargs):
    return lambda: AdaLoraConfig(**{"init_r": 4, "total_step": 10, **kwargs})


def case(model, id=None, **kwargs):
    return ConformanceCase(model, adalora(**kwargs), id=id or model,
                           second_config=adalora(**kwargs, inference_mode=True))


CASES = [
    case("mlp", target_modules=["lin0", "lin1", "lin2"]),
    case("mlp", id="mlp-options-modules-to-save", target_modules="lin[01]", lora_alpha=3, init_lora_weights=False,
         modules_to_save=["lin2"]),
    ConformanceCase("mlp", adalora(target_modules=["lin1"], bias="lora_only"), id="mlp-bias-lora-only",
                    second_config=adalora(target_modules=["lin1"], bias="lora_only", inference_mode=True),
                    changes_base_at_init=True),
    case("conv2d", target_modules=["conv0", "conv1", "lin"]),
    case("llama", target_modules=["q_proj", "v_proj", "down_proj"]),
    case("llama", id="llama-defaults"),
    case("gpt2", target_modules=["c_attn", "c_proj"]),
    case("bert", task_type="SEQ_CLS", target_modules=["query", "value"]),
]

TestAdaLoraConformance = conformance_suite(CASES)
