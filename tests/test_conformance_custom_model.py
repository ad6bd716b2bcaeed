"""The conformance suite also runs on a plugin author's own model and inputs."""

import torch
from torch import nn

from peft_kernel import LoraConfig
from peft_kernel_testing import ConformanceCase, conformance_suite


class Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(5, 9)
        self.down = nn.Linear(9, 3)

    def forward(self, features):
        return self.down(torch.tanh(self.up(features)))


TestCustomModel = conformance_suite([
    ConformanceCase(Tower, lambda: LoraConfig(target_modules=["up", "down"], r=2),
                    inputs=lambda: {"features": torch.linspace(-1, 1, 20).reshape(4, 5)}),
])


def test_model_factory_requires_inputs():
    import pytest

    with pytest.raises(ValueError, match="needs an `inputs` factory"):
        ConformanceCase(Tower, lambda: LoraConfig(target_modules=["up"]))
