"""``peft_kernel.utils.merge_utils`` against HF PEFT's ``peft.utils.merge_utils`` (the oracle):
same names and signatures, same numbers on random tensors (random pruning under the same seed),
and DARE's keep-rate and rescaling law checked statistically."""

from __future__ import annotations

import inspect
import subprocess
import sys
import warnings

import pytest
import torch

hf_mu = pytest.importorskip("peft.utils.merge_utils")

from peft_kernel.utils import merge_utils as mu  # noqa: E402

NAMES = [
    "task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties", "prune",
    "calculate_majority_sign_mask", "disjoint_merge", "magnitude_based_pruning", "random_pruning",
    "reshape_weight_task_tensors",
]


def tasks(n: int = 3, shape: tuple = (6, 5), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("name", NAMES)
def test_same_signature_as_hf(name):
    ours, theirs = inspect.signature(getattr(mu, name)), inspect.signature(getattr(hf_mu, name))
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == \
        [(p.name, p.kind, p.default) for p in theirs.parameters.values()]


def test_importing_utils_stays_light():
    code = "import sys, peft_kernel, peft_kernel.utils; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("shape", [(7,), (6, 5), (4, 3, 2)])
def test_deterministic_merges_equal_hf(shape):
    ts = tasks(3, shape)
    w = torch.tensor([0.7, -0.4, 1.3])
    torch.testing.assert_close(mu.task_arithmetic(ts, w), hf_mu.task_arithmetic(ts, w), atol=1e-6, rtol=0)
    for density in (0.0, 0.3, 0.5, 0.9):
        torch.testing.assert_close(mu.magnitude_prune(ts, w, density), hf_mu.magnitude_prune(ts, w, density),
                                   atol=1e-6, rtol=0)
        for method in ("total", "frequency"):
            torch.testing.assert_close(mu.ties(ts, w, density, method), hf_mu.ties(ts, w, density, method),
                                       atol=1e-6, rtol=0)


def test_helpers_equal_hf():
    ts = tasks(4, (5, 6), seed=3)
    stacked = torch.stack(ts)
    w = torch.tensor([1.0, 0.5, -2.0, 0.25])
    assert torch.equal(mu.reshape_weight_task_tensors(stacked, w), hf_mu.reshape_weight_task_tensors(stacked, w))
    for method in ("total", "frequency"):
        mask = mu.calculate_majority_sign_mask(stacked, method)
        assert torch.equal(mask, hf_mu.calculate_majority_sign_mask(stacked, method))
        torch.testing.assert_close(mu.disjoint_merge(stacked, mask), hf_mu.disjoint_merge(stacked, mask), atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="Unimplemented mask method"):
        mu.calculate_majority_sign_mask(stacked, "bogus")
    for density in (0.0, 0.25, 0.6):
        assert torch.equal(mu.magnitude_based_pruning(ts[0], density), hf_mu.magnitude_based_pruning(ts[0], density))
        assert torch.equal(mu.prune(ts[0], density, "magnitude"), hf_mu.prune(ts[0], density, "magnitude"))


def test_prune_edges_as_hf():
    t = tasks(1)[0]
    with pytest.warns(UserWarning, match="no pruning will be performed"):
        assert mu.prune(t, 1.0, "magnitude") is t
    with pytest.raises(ValueError, match="Density should be >= 0"):
        mu.prune(t, -0.1, "random")
    with pytest.raises(ValueError, match="Unknown method"):
        mu.prune(t, 0.5, "bogus")


@pytest.mark.parametrize("rescale", [True, False])
def test_random_pruning_same_seed_same_mask_as_hf(rescale):
    t = tasks(1, (8, 9))[0]
    torch.manual_seed(123)
    ours = mu.random_pruning(t, 0.4, rescale)
    torch.manual_seed(123)
    theirs = hf_mu.random_pruning(t, 0.4, rescale)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("density", [0.3, 0.7])
def test_dare_merges_same_seed_equal_hf(density):
    ts = tasks(3, (6, 7), seed=5)
    w = torch.tensor([0.5, 1.5, -0.8])
    for ours_fn, hf_fn, extra in ((mu.dare_linear, hf_mu.dare_linear, ()),
                                  (mu.dare_ties, hf_mu.dare_ties, ("total",)),
                                  (mu.dare_ties, hf_mu.dare_ties, ("frequency",))):
        torch.manual_seed(7)
        ours = ours_fn(ts, w, density, *extra)
        torch.manual_seed(7)
        theirs = hf_fn(ts, w, density, *extra)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_dare_keep_rate_and_rescaling_law():
    """Each entry survives with probability ``density`` and survivors are ``value / density``, so the
    expectation is the original tensor."""
    torch.manual_seed(0)
    t = torch.randn(200, 250) + 3.0  # no zeros
    density = 0.3
    pruned = mu.random_pruning(t, density, rescale=True)
    kept = pruned != 0
    rate = kept.float().mean().item()
    n = t.numel()
    assert abs(rate - density) < 4 * (density * (1 - density) / n) ** 0.5
    torch.testing.assert_close(pruned[kept], t[kept] / density)
    # the mean over many draws approaches the original tensor
    torch.manual_seed(1)
    small = torch.randn(50)
    mean = torch.stack([mu.random_pruning(small, 0.5, rescale=True) for _ in range(4000)]).mean(0)
    assert (mean - small).abs().max() < 0.1 * small.abs().max() + 0.1
    # dare_linear of one task with weight 1 is that task's random pruning
    torch.manual_seed(2)
    merged = mu.dare_linear([t], torch.tensor([1.0]), density)
    torch.manual_seed(2)
    assert torch.equal(merged, mu.random_pruning(t, density, rescale=True))


def test_density_one_keeps_everything_like_hf():
    ts = tasks(2)
    w = torch.tensor([1.0, 2.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(mu.dare_linear(ts, w, 1.0), mu.task_arithmetic(ts, w))
        torch.testing.assert_close(mu.dare_ties(ts, w, 1.0), hf_mu.dare_ties(ts, w, 1.0))


def test_merging_guide_example_runs():
    """docs/merging.md's worked example runs as written: each task adapter is best on its task and
    the TIES-merged adapter beats the base model on both tasks."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "docs" / "merging.md").read_text()
    code = re.search(r"## Worked example.*?```python\n(.*?)```", text, re.S).group(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add overhead
    try:
        namespace: dict = {}
        exec(compile(code, "docs/merging.md", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    results = namespace["results"]
    assert results["up"]["up"] < results["down"]["up"] and results["down"]["down"] < results["up"]["down"]
    for task in ("up", "down"):
        assert results["merged"][task] < results["base"][task]


def test_every_public_function_of_hf_merge_utils_is_here():
    public = sorted(n for n, f in inspect.getmembers(hf_mu, inspect.isfunction)
                    if not n.startswith("_") and f.__module__ == hf_mu.__name__)
    assert public == sorted(NAMES) == sorted(mu.__all__)
