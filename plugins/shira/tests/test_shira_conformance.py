"""SHiRA runs the conformance suite (HF cross-loading both ways included) on the toy MLP and tiny
transformers models. HF PEFT's SHiRA wraps ``nn.Linear`` only, so GPT-2 (``Conv1D``) is not a case."""

from peft_kernel_testing import ConformanceCase, conformance_suite
from peft_kernel_shira import ShiraConfig


def shira(**kwargs):
    return lambda: ShiraConfig(**{"r": 1, "random_seed": 0, **kwargs})


CASES = [
    ConformanceCase("mlp", shira(target_modules=["lin0", "lin1", "lin2"])),
    ConformanceCase("mlp", shira(target_modules="lin[01]", r=3, random_seed=None, init_weights=False, modules_to_save=["lin2"]),
                    id="mlp-regex-r3-noseed-randn-modules-to-save"),
    ConformanceCase("llama", shira(target_modules=["q_proj", "v_proj", "down_proj"], r=2, random_seed=42)),
    ConformanceCase("llama", shira(r=1), id="llama-default-targets"),
    ConformanceCase("bert", shira(task_type="SEQ_CLS", target_modules=["query", "value"])),
]

TestShiraConformance = conformance_suite(CASES)
