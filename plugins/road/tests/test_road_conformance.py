"""RoAd runs the conformance suite (HF cross-loading both ways included) on the toy MLP and tiny
transformers models, for every variant. HF PEFT's RoAd wraps ``nn.Linear`` only (no GPT-2 ``Conv1D``)."""

from peft_kernel_testing import ConformanceCase, conformance_suite
from peft_kernel_road import RoadConfig


def road(**kwargs):
    return lambda: RoadConfig(**{"group_size": 4, **kwargs})


CASES = [
    ConformanceCase("mlp", road(target_modules=["lin0", "lin1", "lin2"]), id="mlp-road_1"),
    ConformanceCase("mlp", road(target_modules="lin[01]", variant="road_2", group_size=8, modules_to_save=["lin2"]),
                    id="mlp-road_2-regex-modules-to-save"),
    ConformanceCase("mlp", road(target_modules=["lin0", "lin1"], variant="road_4", group_size=16, init_weights=False),
                    id="mlp-road_4-randn"),
    ConformanceCase("llama", road(target_modules=["q_proj", "v_proj", "down_proj"], variant="road_1"), id="llama-road_1"),
    ConformanceCase("llama", road(target_modules=["k_proj", "up_proj"], variant="road_2", group_size=2), id="llama-road_2"),
    ConformanceCase("llama", road(variant="road_4", group_size=8), id="llama-road_4-default-targets"),
    ConformanceCase("bert", road(task_type="SEQ_CLS", target_modules=["query", "value"], variant="road_2"), id="bert-seq-cls"),
]

TestRoadConformance = conformance_suite(CASES)
