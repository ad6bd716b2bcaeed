"""``peft_kernel_lowrank.derived.DerivedFactors``: one cached value per adapter while its sources
are unchanged, recomputed on replacement, in-place writes and moves; never cached under autograd;
normal tensors even when computed under ``torch.inference_mode()``."""

import torch
from torch import nn

from peft_kernel_lowrank.derived import DerivedFactors


def _setup():
    cache = DerivedFactors()
    source = nn.Parameter(torch.ones(3), requires_grad=False)
    calls = []

    def compute():
        calls.append(1)
        return source * 2

    return cache, source, calls, compute


def test_cached_until_a_source_changes():
    cache, source, calls, compute = _setup()
    first = cache.get("a", (source,), compute)
    assert cache.get("a", (source,), compute) is first and len(calls) == 1
    with torch.no_grad():
        source.add_(1)  # an optimizer step or a load: _version moves
    second = cache.get("a", (source,), compute)
    assert second is not first and torch.equal(second, torch.full((3,), 4.0))
    replaced = nn.Parameter(source.detach().clone(), requires_grad=False)
    assert cache.get("a", (replaced,), compute) is not second  # another tensor object
    assert len(cache) == 1
    cache.drop("a")
    assert len(cache) == 0


def test_not_cached_under_autograd():
    cache, source, calls, compute = _setup()
    source.requires_grad_(True)
    out = cache.get("a", (source,), compute)
    assert out.requires_grad and len(cache) == 0
    with torch.no_grad():
        assert not cache.get("a", (source,), compute).requires_grad and len(cache) == 1


def test_inference_mode_gives_normal_tensors():
    cache, source, calls, compute = _setup()
    with torch.inference_mode():
        value = cache.get("a", (source,), compute)
    assert not value.is_inference()
    assert value._version == 0  # what the stacked kernels read
    assert cache.get("a", (source,), compute) is value
