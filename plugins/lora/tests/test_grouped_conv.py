"""LoRA on grouped convolutions (``groups > 1``), cross-loaded with HF ``peft`` both ways.

As in HF PEFT: ``lora_B`` carries the base layer's groups, the rank must be divisible by them, and
such adapters cannot be merged. DoRA on them is refused here (HF accepts it; see ``ConvNd``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peft_kernel as pk
from peft_kernel_testing.hf_oracle import max_abs_diff, perturb, run

peft = pytest.importorskip("peft")

TOL = 1e-5
SHAPES = {1: (9,), 2: (6, 6), 3: (4, 4, 4)}


class GroupedNet(nn.Module):
    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.grouped = conv(4, 8, 3, padding=1, groups=2)
        self.depthwise = conv(8, 8, 3, groups=8, bias=False)
        self.plain = conv(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.plain(torch.relu(self.depthwise(torch.relu(self.grouped(x))))).flatten(1)


def make(dims: int) -> nn.Module:
    torch.manual_seed(0)
    return GroupedNet(dims).eval()


def inputs(dims: int) -> dict:
    return {"x": torch.randn(3, 4, *SHAPES[dims], generator=torch.Generator().manual_seed(1))}


def config(lib, **kwargs):
    return lib.LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": ["grouped", "depthwise", "plain"], **kwargs})


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_hf_to_ours(dims, tmp_path):
    with pytest.warns(UserWarning, match="groups > 1"):
        hf = peft.get_peft_model(make(dims), config(peft))
    perturb(hf, 3)
    hf.save_pretrained(tmp_path)
    expected = run(hf.eval(), inputs(dims))
    assert max_abs_diff(expected, run(make(dims), inputs(dims))) > 1e-3
    with pytest.warns(UserWarning, match="groups > 1"):
        ours = pk.PeftModel.from_pretrained(make(dims), tmp_path)
    assert ours.base_model.model.grouped.lora_B["default"].groups == 2
    assert max_abs_diff(run(ours, inputs(dims)), expected) <= TOL


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_ours_to_hf(dims, tmp_path):
    ours = pk.get_peft_model(make(dims), config(pk, rank_pattern={"depthwise": 16}))
    perturb(ours, 4)
    ours.save_pretrained(tmp_path)
    expected = run(ours.eval(), inputs(dims))
    hf = peft.PeftModel.from_pretrained(make(dims), tmp_path)
    assert max_abs_diff(run(hf, inputs(dims)), expected) <= TOL


def test_mixed_batch_rows_match_hf_single_adapter_runs(tmp_path):
    hf = peft.get_peft_model(make(2), config(peft), adapter_name="first")
    hf.add_adapter("second", config(peft, r=16, lora_alpha=8))
    hf.base_model.set_adapter(["first", "second"])
    perturb(hf, 5)
    hf.save_pretrained(tmp_path)
    x = inputs(2)
    single = {}
    for name in ("first", "second"):
        hf.set_adapter(name)
        single[name] = run(hf.eval(), x)
    with hf.disable_adapter():
        single["__base__"] = run(hf, x)
    ours = pk.PeftModel.from_pretrained(make(2), tmp_path / "first", adapter_name="first")
    ours.load_adapter(tmp_path / "second", adapter_name="second")
    names = ["second", "__base__", "first"]
    mixed = run(ours.eval(), x, adapter_names=names)
    for row, name in enumerate(names):
        assert max_abs_diff(mixed[row], single[name][row]) <= TOL, f"row {row} ({name})"


def test_merge_is_refused_as_in_hf():
    ours = pk.get_peft_model(make(2), config(pk, target_modules=["grouped"]))
    perturb(ours, 6)
    before = run(ours.eval(), inputs(2))
    with pytest.raises(NotImplementedError, match="groups > 1"):
        ours.merge_and_unload()
    assert not ours.base_model.model.grouped.merged
    assert max_abs_diff(run(ours, inputs(2)), before) == 0
    # the plain (groups=1) conv still merges
    plain = pk.get_peft_model(make(2), config(pk, target_modules=["plain"]))
    perturb(plain, 6)
    before = run(plain.eval(), inputs(2))
    assert max_abs_diff(run(plain.merge_and_unload(), inputs(2)), before) <= TOL


def test_rank_not_divisible_by_groups():
    model = make(2)
    with pytest.raises(ValueError, match="groups=8 and rank 4.*divisible by groups"):
        pk.get_peft_model(model, config(pk, r=4, target_modules=["depthwise"]))
    assert isinstance(model.depthwise, nn.Conv2d)  # injection is all or nothing
    with pytest.raises(ValueError, match="groups=2 and rank 3"):
        pk.get_peft_model(make(2), config(pk, r=3, target_modules=["grouped"]))
    with pytest.raises(ValueError, match="groups=2 and rank 3"):
        pk.get_peft_model(make(2), config(pk, target_modules=["grouped"], rank_pattern={"grouped": 3}))


def test_dora_is_refused_on_grouped_convs():
    with pytest.raises(ValueError, match="DoRA is not supported for grouped convolutions"):
        pk.get_peft_model(make(2), config(pk, use_dora=True, target_modules=["grouped"]))
