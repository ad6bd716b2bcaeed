"""``DerivedFactors`` hands back the same value while its sources are unchanged, and rebuilds it
after any change the stacked kernels must see."""

import torch
from torch import nn

from peft_kernel_lowrank.derived import DerivedFactors


def test_rebuilt_only_when_a_source_changes():
    cache = DerivedFactors()
    p = nn.Parameter(torch.ones(3))
    buf = torch.full((3,), 2.0)
    builds = []

    def build():
        builds.append(1)
        return p * buf

    first = cache.get("a", (p, buf), build)
    assert cache.get("a", (p, buf), build) is first and len(builds) == 1
    assert not first.requires_grad  # built without autograd
    with torch.no_grad():
        p.add_(1.0)  # an optimizer step: _version
    second = cache.get("a", (p, buf), build)
    assert second is not first and torch.equal(second, torch.full((3,), 4.0))
    p.data = p.data.double()  # a recast: dtype and data_ptr
    assert cache.get("a", (p, buf), build).dtype == torch.float64
    other = torch.full((3,), 2.0)  # a replaced source (load_state_dict(assign=True), .to())
    assert cache.get("a", (p, other), build) is not cache.get("a", (p, buf), build)
    cache.drop("a")
    count = len(builds)
    cache.get("a", (p, buf), build)
    assert len(builds) == count + 1
