"""AdaLoRA trains through peft-kernel's ``Trainer`` and ``peft-kernel finetune`` with no user code:
the ``peft_kernel_training_step`` hook reallocates ranks after each optimizer step, exactly as a
stock transformers ``Trainer`` with a hand-written callback does for HF peft."""

from __future__ import annotations

import json

import pytest
import torch

from peft_kernel import AdaLoraConfig, get_peft_model
from peft_kernel_testing import make_model
from peft_kernel_testing.hf_oracle import hf_oracle, hf_peft

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
finetune_trainer = pytest.importorskip("peft_kernel_finetune.trainer")

SEQ = 8
CONFIG = dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], init_r=4, target_r=2, total_step=6, tinit=1,
              tfinal=2, deltaT=1)


def _rows(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, 64, (SEQ,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": ids.clone()})
    return rows


def _args(tmp_path, name: str):
    return transformers.TrainingArguments(str(tmp_path / name), max_steps=6, per_device_train_batch_size=4,
                                          learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                                          dataloader_num_workers=0, disable_tqdm=True, use_cpu=True)


def test_our_trainer_reallocates_ranks_like_hf_with_a_callback(tmp_path) -> None:
    peft = hf_peft()

    class Reallocate(transformers.TrainerCallback):  # what HF peft users write by hand
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            model.base_model.update_and_allocate(state.global_step)

    with hf_oracle("HF peft training AdaLoRA with the stock Trainer"):
        theirs = peft.get_peft_model(make_model("llama"), peft.AdaLoraConfig(**CONFIG))
        start = {n: p.detach().clone() for n, p in theirs.named_parameters()}
        transformers.Trainer(model=theirs, args=_args(tmp_path, "hf"), train_dataset=_rows(24),
                             callbacks=[Reallocate()]).train()
    ours = get_peft_model(make_model("llama"), AdaLoraConfig(**CONFIG))
    with torch.no_grad():
        for name, param in ours.named_parameters():
            param.copy_(start[name])
    finetune_trainer.Trainer(model=ours, args=_args(tmp_path, "ours"), train_dataset=_rows(24)).train()
    hf_pattern = {k.replace(".default", ""): v for k, v in theirs.peft_config["default"].rank_pattern.items()}
    assert ours.peft_config["default"].rank_pattern == hf_pattern
    assert sum(sum(mask) for mask in hf_pattern.values()) == 2 * 4
    hf_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        assert (param - hf_params[name]).abs().max().item() <= 1e-5, name


def test_finetune_command_trains_adalora(tmp_path) -> None:
    from peft_kernel.cli import main

    out = tmp_path / "out"
    assert main(["finetune", "--method", "adalora", "--output", str(out), "--max-steps", "3", "--no-progress",
                 "--eval-split", "0", "--peft", "total_step=3", "--peft", "init_r=4", "--peft", "target_r=1"]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["rank_pattern"]  # the final allocation is in the saved config
    assert all(sum(mask) <= 4 for mask in saved["rank_pattern"].values())
