"""``SpectralLayer``: the dense coefficient matrix, and ``delta`` / ``delta_weight`` in both layouts."""

import pytest
import torch
from torch import nn

from peft_kernel_spectral import SpectralLayer, seeded_positions

transformers = pytest.importorskip("transformers")


class Doubling(SpectralLayer):
    """``delta W``: twice the coefficient matrix of the learned values."""

    adapter_layer_names = ("toy_values",)
    other_param_names = ("toy_positions",)

    def __init__(self, base_layer, fan_in_fan_out):
        super().__init__(base_layer, fan_in_fan_out)
        self.toy_values = nn.ParameterDict()
        self.toy_positions = {}

    def update_layer(self, adapter_name, config=None, module_name=""):
        self.toy_values[adapter_name] = nn.Parameter(torch.randn(7))
        self.toy_positions[adapter_name] = seeded_positions(1, self.out_features, self.in_features, 7)

    def spectral_delta(self, adapter_name):
        return 2 * self.coefficient_matrix(self.toy_values[adapter_name], self.toy_positions, adapter_name)


@pytest.mark.parametrize("base,fan_in_fan_out", [(nn.Linear(5, 3), False),
                                                 (transformers.pytorch_utils.Conv1D(3, 5), True)])
def test_delta_and_delta_weight_follow_the_layout(base, fan_in_fan_out):
    layer = Doubling(base, fan_in_fan_out)
    layer.update_layer("a")
    layer.set_adapter("a")
    assert (layer.out_features, layer.in_features) == (3, 5)
    rows, cols = layer.toy_positions["a"]
    expected = torch.zeros(3, 5)
    expected[rows, cols] = 2 * layer.toy_values["a"].detach()
    torch.testing.assert_close(layer.spectral_delta("a"), expected)
    assert layer.delta_weight("a").shape == base.weight.shape
    x = torch.randn(4, 5)
    torch.testing.assert_close(layer(x), base(x) + x @ expected.T)


def test_the_coefficient_matrix_is_float32_or_wider():
    layer = Doubling(nn.Linear(5, 3).to(torch.bfloat16), False)
    layer.update_layer("a")
    layer.toy_values["a"].data = layer.toy_values["a"].data.to(torch.bfloat16)
    assert layer.coefficient_matrix(layer.toy_values["a"], layer.toy_positions, "a").dtype == torch.float32
    values = torch.ones(7, dtype=torch.float64)
    assert layer.coefficient_matrix(values, layer.toy_positions, "a").dtype == torch.float64
