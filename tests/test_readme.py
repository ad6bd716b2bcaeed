"""The README's tour runs as written."""

from __future__ import annotations

import pathlib
import re

import torch


def test_readme_tour_runs(tmp_path, monkeypatch):
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    tour = re.search(r"## A short tour\n\n```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(tour, "README.md", "exec"), namespace)
    assert (tmp_path / "out" / "adapter-b" / "adapter_model.safetensors").exists()
    assert namespace["logits"].shape == (4, 12, 64)
    assert namespace["tokens"].shape[0] == 4
    model = namespace["model"]
    model.set_adapter("b")
    with torch.no_grad():
        alone = model(input_ids=namespace["ids"]).logits
    torch.testing.assert_close(namespace["logits"][1], alone[1], atol=1e-5, rtol=0)
