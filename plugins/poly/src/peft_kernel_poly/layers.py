"""The Poly layer for ``nn.Linear``: a bank of LoRA skills mixed per row by a per-task router.

Each adapter holds ``poly_lora_A`` ``[n_splits, n_skills, in / n_splits, r]`` and ``poly_lora_B``
``[n_splits, n_skills, r, out / n_splits]``, and a :class:`PolyRouter` with ``module_logits``
``[n_tasks, n_splits * n_skills]``. For a row of task ``t`` the router gives, per split ``q``, weights
``w[q, s]`` over the skills (``sigmoid`` of the logits in eval mode, a relaxed-Bernoulli sample of
temperature 1 in training mode, each split's weights divided by their sum). The row's LoRA is
``A_t = concat_q(sum_s w[q, s] A[q, s])`` (the splits stacked along the input features) and likewise
``B_t`` along the output features, and the row gains ``x A_t B_t / r``. Rows are served at once: each
row's weights are gathered and the row's ``A_t``, ``B_t`` built by one ``einsum``, then two batched
matmuls. Imported on first use only (it imports torch).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from peft_kernel.plugin_api import AdapterLayer, ConfigError, MixedBatchError, current_task_ids
from peft_kernel_poly.config import PolyConfig

EPS = 1e-12
"""Added to each split's sum of skill weights before dividing by it."""


class PolyRouter(nn.Module):
    """Per-task logits over the skills of each split (HF PEFT's ``PolyRouter``, saved as
    ``poly_router.module_logits``)."""

    def __init__(self, n_tasks: int, n_splits: int, n_skills: int, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.n_splits, self.n_skills = n_splits, n_skills
        self.module_logits = nn.Parameter(torch.empty(n_tasks, n_splits * n_skills, device=device, dtype=dtype))
        nn.init.uniform_(self.module_logits, -1e-3, 1e-3)

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        """``[rows, n_splits, n_skills]``: each row's skill weights per split, summing to one."""
        logits = self.module_logits.index_select(0, task_ids)
        if self.training:
            temperature = torch.tensor(1.0, device=logits.device, dtype=logits.dtype)
            weights = torch.distributions.RelaxedBernoulli(temperature, logits=logits).rsample()
        else:
            weights = torch.sigmoid(logits)
        weights = weights.view(-1, self.n_splits, self.n_skills)
        return weights / (weights.sum(dim=-1, keepdim=True) + EPS)


class PolyLinear(AdapterLayer):
    """Poly for ``nn.Linear``; every forward needs the rows' ``task_ids``."""

    adapter_layer_names = ("poly_router", "poly_lora_A", "poly_lora_B")
    other_param_names = ("r", "n_tasks", "n_skills", "n_splits")

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.out_features, self.in_features = base_layer.weight.shape
        self.r: dict[str, int] = {}
        self.n_tasks: dict[str, int] = {}
        self.n_skills: dict[str, int] = {}
        self.n_splits: dict[str, int] = {}
        self.poly_router = nn.ModuleDict()
        self.poly_lora_A = nn.ParameterDict()
        self.poly_lora_B = nn.ParameterDict()

    # ---- creation ---------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: PolyConfig, module_name: str = "") -> None:
        splits = config.n_splits
        for what, size in (("in_features", self.in_features), ("out_features", self.out_features)):
            if size % splits:
                raise ConfigError(
                    f"PolyConfig.n_splits={splits} does not divide the {what} ({size}) of {module_name!r}: each "
                    "skill is cut into n_splits equal blocks along the input and the output features."
                )
        r, skills = config.r, config.n_skills
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        a = torch.empty(splits, skills, self.in_features // splits, r, device=weight.device, dtype=dtype)
        b = torch.empty(splits, skills, r, self.out_features // splits, device=weight.device, dtype=dtype)
        for block in (*a.view(-1, *a.shape[2:]), *([] if config.init_weights else b.view(-1, *b.shape[2:]))):
            nn.init.kaiming_uniform_(block.T, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(b)
        self.r[adapter_name] = r
        self.n_tasks[adapter_name] = config.n_tasks
        self.n_skills[adapter_name] = skills
        self.n_splits[adapter_name] = splits
        self.poly_router[adapter_name] = PolyRouter(config.n_tasks, splits, skills, weight.device, dtype)
        self.poly_lora_A[adapter_name] = nn.Parameter(a)
        self.poly_lora_B[adapter_name] = nn.Parameter(b)

    # ---- the update -------------------------------------------------------------------------
    def _task_ids(self, rows: int, device: torch.device) -> torch.Tensor:
        tasks = current_task_ids(rows, device)
        if tasks is None:
            raise MixedBatchError("Poly needs task_ids: pass task_ids=<one task id per row> to forward and generate.")
        return tasks

    def row_delta(self, x: torch.Tensor, adapter_name: str, tasks: torch.Tensor) -> torch.Tensor:
        """The update of each row of ``x`` (``[rows, ..., in]``) for its task in ``tasks`` (``[rows]``)."""
        n_tasks = self.n_tasks[adapter_name]
        if tasks.numel() and (int(tasks.min()) < 0 or int(tasks.max()) >= n_tasks):
            raise MixedBatchError(f"task_ids must be from 0 to n_tasks - 1 = {n_tasks - 1} (adapter "
                                  f"{adapter_name!r}); got {sorted(set(tasks.tolist()))}")
        a, b = self.poly_lora_A[adapter_name], self.poly_lora_B[adapter_name]
        rows, r = x.shape[0], self.r[adapter_name]
        weights = self.poly_router[adapter_name](tasks)  # [rows, splits, skills]
        row_a = torch.einsum("bqs,qsdr->bqdr", weights, a).reshape(rows, self.in_features, r)
        row_b = torch.einsum("bqs,qsrd->bqrd", weights, b).transpose(1, 2).reshape(rows, r, self.out_features)
        flat = x.to(a.dtype).reshape(rows, -1, self.in_features)
        delta = torch.bmm(torch.bmm(flat, row_a), row_b) / r
        return delta.reshape(*x.shape[:-1], self.out_features)

    def delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return self.row_delta(x, adapter_name, self._task_ids(x.shape[0], x.device))

    def mixed_forward(self, x: torch.Tensor, routing: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``adapter_names`` rows: each adapter's rows with their own task ids (one pass per adapter)."""
        result = self.base_layer(x, *args, **kwargs)
        groups = {n: rows for n, rows in routing.groups(x.shape[0], x.device).items() if self.has_adapter(n)}
        if groups:
            tasks = self._task_ids(x.shape[0], x.device)
            for name, rows in groups.items():
                delta = self.row_delta(x.index_select(0, rows), name, tasks.index_select(0, rows))
                result = result.index_add(0, rows, delta.to(result.dtype))
        return result

    # ---- merging: a row's update depends on its task, so there is no one weight to fold ------
    def merge_into_base(self, adapter_name: str, safe_merge: bool = False) -> None:
        raise NotImplementedError(
            "Poly cannot be merged: each row's update depends on its task_ids, so no single weight holds it."
        )

    def unmerge_from_base(self, adapter_name: str) -> None:
        raise NotImplementedError("Poly cannot be merged, so there is nothing to unmerge.")


def make_layer(config: PolyConfig, adapter_name: str, base_layer: nn.Module, module_name: str) -> PolyLinear | None:
    """The layer for an ``nn.Linear``; ``None`` (the core's named error) for any other type, as HF
    PEFT's Poly supports ``torch.nn.Linear`` only."""
    if not isinstance(base_layer, nn.Linear):
        return None
    layer = PolyLinear(base_layer)
    layer.update_layer(adapter_name, config, module_name)
    return layer
