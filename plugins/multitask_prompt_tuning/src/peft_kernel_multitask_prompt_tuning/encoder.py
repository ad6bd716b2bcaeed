"""``MultitaskPromptEmbedding``: a shared prompt scaled elementwise, per task, by a low-rank factor."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from peft_kernel.plugin_api import CheckpointError, MixedBatchError
from peft_kernel_multitask_prompt_tuning.config import MultitaskPromptTuningConfig, MultitaskPromptTuningInit
from peft_kernel_prompt_learning.learner import PromptEncoder
from peft_kernel_prompt_learning.text_init import embedded_tokens, text_token_ids

FACTORS = ("prefix_task_cols", "prefix_task_rows")
"""The task factors' parameter names, also their top-level on-disk keys (HF PEFT's)."""

INIT_STD = 0.02
"""Standard deviation of randomly initialised task factors (HF PEFT's)."""


class MultitaskPromptEmbedding(PromptEncoder):
    """Virtual tokens ``embedding.weight * (prefix_task_cols[t] @ prefix_task_rows[t])`` for a row of
    task ``t`` (HF PEFT's ``MultitaskPromptEmbedding``).

    ``embedding`` ``[n, token_dim]`` is the shared prompt (saved as ``prompt_embeddings``);
    ``prefix_task_cols`` ``[num_tasks, n, num_ranks]`` and ``prefix_task_rows``
    ``[num_tasks, num_ranks, token_dim]`` are the task factors, saved under their own names.
    """

    takes_task_ids = True
    prompts_decoder = True  # on an encoder-decoder the second n tokens go in front of the decoder, as in HF PEFT

    def __init__(self, config: MultitaskPromptTuningConfig, word_embeddings: nn.Module) -> None:
        super().__init__()
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.num_tasks = config.num_tasks
        # HF PEFT's order of random draws: the embedding, then the columns, then the rows
        self.embedding = nn.Embedding(total, config.token_dim)
        self.prefix_task_cols = nn.Parameter(torch.normal(0.0, INIT_STD, (config.num_tasks, total, config.num_ranks)))
        self.prefix_task_rows = nn.Parameter(torch.normal(0.0, INIT_STD, (config.num_tasks, config.num_ranks, config.token_dim)))
        init = config.prompt_tuning_init
        if config.inference_mode or init == MultitaskPromptTuningInit.RANDOM:
            return  # weights come from a checkpoint, or stay random
        if init == MultitaskPromptTuningInit.TEXT:
            ids = text_token_ids(config.prompt_tuning_init_text, config.tokenizer_name_or_path, config.tokenizer_kwargs, total)
            self.embedding.weight = nn.Parameter(embedded_tokens(word_embeddings, ids))
        else:
            self._init_from_source(config)

    def _init_from_source(self, config: MultitaskPromptTuningConfig) -> None:
        path = config.prompt_tuning_init_state_dict_path
        source = _read_state_dict(path)
        init = config.prompt_tuning_init
        wanted = ["prompt_embeddings"] + (list(FACTORS) if init != MultitaskPromptTuningInit.ONLY_SOURCE_SHARED else [])
        missing = [k for k in wanted if k not in source]
        if missing:
            raise CheckpointError(f"prompt_tuning_init_state_dict_path {path!r} has no {missing} "
                                  f"(prompt_tuning_init={init.value} needs {wanted}).")
        loaded = {"embedding.weight": source["prompt_embeddings"]}
        if init == MultitaskPromptTuningInit.AVERAGE_SOURCE_TASKS:
            loaded.update({name: source[name].mean(0, keepdim=True) for name in FACTORS})
        elif init == MultitaskPromptTuningInit.EXACT_SOURCE_TASK:
            task = config.prompt_tuning_init_task
            tasks = source[FACTORS[0]].shape[0]
            if task >= tasks:
                raise CheckpointError(f"prompt_tuning_init_task={task} but the source {path!r} has {tasks} tasks.")
            loaded.update({name: source[name][task: task + 1] for name in FACTORS})
        own = self.state_dict()
        wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in loaded.items() if v.shape != own[k].shape]
        if wrong:
            raise CheckpointError(f"the source {path!r} does not fit this adapter (source vs adapter): {wrong}")
        self.load_state_dict(loaded, strict=False)

    def forward(self, task_ids: torch.Tensor | None) -> torch.Tensor:
        """``[rows, n, token_dim]``: the virtual tokens of each row's task."""
        if task_ids is None:
            raise MixedBatchError("task_ids cannot be None: multitask prompt tuning needs one task id per row "
                             "(pass task_ids=[...] to forward/generate).")
        if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= self.num_tasks):
            raise MixedBatchError(f"task_ids must be in [0, {self.num_tasks}) (num_tasks); got {task_ids.tolist()}.")
        scale = torch.matmul(self.prefix_task_cols.index_select(0, task_ids), self.prefix_task_rows.index_select(0, task_ids))
        return self.embedding.weight.unsqueeze(0) * scale

    def saved_prompt(self) -> torch.Tensor:
        return self.embedding.weight.detach()

    def top_level_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in FACTORS}


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file, or else a torch-saved state dict (read with ``weights_only``)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"prompt_tuning_init_state_dict_path {path!r} is not a file.")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)
