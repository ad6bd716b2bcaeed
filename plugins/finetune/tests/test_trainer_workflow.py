"""transformers' Trainer with peft-kernel models: the stock Trainer trains (eval_loss, gradient
accumulation, load_best_model_at_end, save_total_limit) with the same losses as HF peft's model;
``peft_kernel_finetune.trainer.Trainer`` writes adapter-only checkpoints that resume to the
same final loss, open with HF's ``PeftModel.from_pretrained`` and ``peft-kernel inspect``."""

from __future__ import annotations

import json
import os

import pytest
import torch

from peft_kernel_testing.hf_oracle import hf_oracle, hf_peft

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

VOCAB, SEQ = 64, 12


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: more CPU threads only add overhead (and contention on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_llama():
    from transformers.models.llama.configuration_llama import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0)
    return LlamaForCausalLM(config)


def _rows(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Token rows with a learnable pattern (each token is the previous one + 1, mod the vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(1, VOCAB, (1,), generator=g))
        ids = (torch.arange(SEQ) + start) % (VOCAB - 1) + 1
        rows.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": ids.clone()})
    return rows


TRAIN, EVAL = _rows(32, 1), _rows(8, 2)


def _args(tmp_path, name: str, **kwargs):
    # the defaults, except: a few steps, every step logged, no reporting integrations, no threads
    base = dict(max_steps=4, logging_steps=1, report_to=[], per_device_train_batch_size=4,
                per_device_eval_batch_size=8, learning_rate=1e-2, dataloader_num_workers=0, disable_tqdm=True)
    base.update(kwargs)
    return transformers.TrainingArguments(str(tmp_path / name), **base)


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _configs(method: str):
    from peft_kernel import IA3Config, LoraConfig

    peft = hf_peft()
    if method == "lora":
        kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
        return LoraConfig(**kwargs), peft.LoraConfig(**kwargs)
    kwargs = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM")
    return IA3Config(**kwargs), peft.IA3Config(**kwargs)


def _perturb_hf(model, seed: int) -> None:
    """Move HF's adapter away from its identity init, so both start from the same non-trivial adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=g))


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_stock_trainer_trains_like_hf_peft(tmp_path, method):
    """Stock Trainer, default arguments (plus gradient accumulation, an eval set, load_best_model_at_end,
    save_total_limit): every logged training loss and eval_loss equal HF peft's run with the same seed,
    data and starting adapter, and so does the adapter the best checkpoint restores (the stock Trainer's
    checkpoints hold the full model, see peft_kernel_finetune.trainer)."""
    from peft_kernel import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    peft = hf_peft()
    ours_config, hf_config = _configs(method)
    ours = get_peft_model(_tiny_llama(), ours_config)
    # the defaults plus gradient accumulation, evaluation, best-model tracking and a checkpoint limit
    extra = dict(gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=2, save_steps=2,
                 load_best_model_at_end=True, save_total_limit=1)
    with hf_oracle("HF peft training with the stock Trainer"):
        reference = peft.get_peft_model(_tiny_llama(), hf_config)
        _perturb_hf(reference, seed=3)
        start = {k: v.clone() for k, v in peft.get_peft_model_state_dict(reference).items()}  # not views: HF trains next
        hf_trainer = transformers.Trainer(model=reference, args=_args(tmp_path, "hf", **extra), train_dataset=TRAIN, eval_dataset=EVAL)
        hf_trainer.train()
    set_peft_model_state_dict(ours, start)
    # the Trainer seeds the global RNG (which orders the batches) when it is built: build it just before training
    trainer = transformers.Trainer(model=ours, args=_args(tmp_path, "ours", **extra), train_dataset=TRAIN, eval_dataset=EVAL)
    # the columns survive the signature filter, labels are found, num_items_in_batch reaches the loss
    assert trainer.label_names == ["labels"] and trainer.model_accepts_loss_kwargs
    trainer.train()
    assert len(_losses(trainer)) == 4
    torch.testing.assert_close(torch.tensor(_losses(trainer)), torch.tensor(_losses(hf_trainer)), rtol=1e-4, atol=1e-5)
    ours_eval = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    hf_eval = [e["eval_loss"] for e in hf_trainer.state.log_history if "eval_loss" in e]
    assert len(ours_eval) == 2
    torch.testing.assert_close(torch.tensor(ours_eval), torch.tensor(hf_eval), rtol=1e-4, atol=1e-5)
    trained = get_peft_model_state_dict(ours)  # after load_best_model_at_end: the best checkpoint's adapter
    for key, value in peft.get_peft_model_state_dict(reference).items():
        torch.testing.assert_close(trained[key], value, rtol=1e-4, atol=1e-5)
    assert trainer.state.best_model_checkpoint is not None
    assert os.path.basename(trainer.state.best_model_checkpoint) == os.path.basename(hf_trainer.state.best_model_checkpoint)
    assert len([d for d in os.listdir(tmp_path / "ours") if d.startswith("checkpoint-")]) <= 2  # save_total_limit


def _adapter_trainer(tmp_path, name: str, **kwargs):
    from peft_kernel import LoraConfig, get_peft_model
    from peft_kernel_finetune.trainer import Trainer

    torch.manual_seed(5)
    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                                     init_lora_weights="gaussian"))
    args = _args(tmp_path, name, save_steps=2, eval_strategy="steps", eval_steps=2, **kwargs)
    return Trainer(model=model, args=args, train_dataset=TRAIN, eval_dataset=EVAL)


def test_checkpoints_are_adapter_only_and_resume_to_the_same_loss(tmp_path):
    from peft_kernel import PeftModel
    from peft_kernel.cli import main

    full = _adapter_trainer(tmp_path, "full")
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    files = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files
    assert not {"model.safetensors", "pytorch_model.bin", "config.json"} & files  # no base weights
    full.save_model(str(tmp_path / "final"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "final"))
    assert "model.safetensors" not in os.listdir(tmp_path / "final")

    # resume from the step-2 checkpoint: adapter, optimizer and scheduler come back, same final loss
    resumed = _adapter_trainer(tmp_path, "full")  # a fresh adapter (another init), overwritten by the checkpoint
    resumed.train(resume_from_checkpoint=str(checkpoint))
    torch.testing.assert_close(torch.tensor(_losses(resumed)[-2:]), torch.tensor(_losses(full)[-2:]), rtol=1e-5, atol=1e-6)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b)

    # the checkpoint folder opens as an adapter: ours, HF's, and `peft-kernel inspect`
    ours = PeftModel.from_pretrained(_tiny_llama(), str(checkpoint))
    ids = EVAL[0]["input_ids"][None]
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
    peft = hf_peft()
    hf = peft.PeftModel.from_pretrained(_tiny_llama(), str(checkpoint))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)
    assert main(["inspect", str(checkpoint), "--json"]) == 0


def test_load_best_model_at_end_with_adapter_checkpoints(tmp_path, capsys):
    from peft_kernel_finetune.trainer import load_adapter_checkpoint

    trainer = _adapter_trainer(tmp_path, "best", load_best_model_at_end=True, save_total_limit=1,
                               metric_for_best_model="eval_loss")
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and os.path.isfile(os.path.join(best, "adapter_model.safetensors"))
    kept = [d for d in os.listdir(tmp_path / "best") if d.startswith("checkpoint-")]
    assert len(kept) <= 2  # save_total_limit=1 keeps the best one as well
    state = json.loads((tmp_path / "best" / kept[0] / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] is not None
    # the model now holds the best checkpoint's adapter
    from peft_kernel import get_peft_model_state_dict
    from peft_kernel.peft_weights import load_peft_weights

    saved = load_peft_weights(best, device="cpu")
    live = get_peft_model_state_dict(trainer.model)
    for key, value in saved.items():
        torch.testing.assert_close(live[key], value)
    with pytest.raises(Exception, match="no adapter checkpoint"):
        load_adapter_checkpoint(trainer.model, str(tmp_path))


def test_a_peft_model_without_task_type_trains_with_the_integration_trainer(tmp_path):
    """``get_peft_model(model, LoraConfig(...))`` without ``task_type`` is the plain ``PeftModel``, whose
    ``forward(*args, **kwargs)`` names no input: the integration Trainer reads the names from the base
    model, as transformers does for HF peft's models, so the columns survive and eval_loss is reported."""
    from peft_kernel import LoraConfig, PeftModel, get_peft_model
    from peft_kernel_finetune.trainer import Trainer

    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert type(model) is PeftModel
    trainer = Trainer(model=model, args=_args(tmp_path, "plain", max_steps=2, eval_strategy="steps", eval_steps=2, save_steps=2),
                      train_dataset=TRAIN, eval_dataset=EVAL)
    assert trainer.label_names == ["labels"]
    trainer.train()
    assert len(_losses(trainer)) == 2 and any("eval_loss" in e for e in trainer.state.log_history)
    assert "adapter_model.safetensors" in os.listdir(tmp_path / "plain" / "checkpoint-2")


def test_the_trainer_calls_the_training_step_hook_after_each_optimizer_step(tmp_path, isolated_registry):
    """``peft_kernel_finetune.trainer.Trainer`` calls ``peft_kernel_training_step`` once per optimizer
    step (not per micro-batch), with the 0-based step, while the step's gradients are still there."""
    import types
    from importlib import metadata

    from peft_kernel import LoraConfig, get_peft_model, hookimpl
    from peft_kernel_finetune.trainer import Trainer

    seen: list[tuple[int, bool]] = []

    @hookimpl
    def peft_kernel_training_step(model, global_step):
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        seen.append((global_step, any(g is not None and bool(g.abs().sum() > 0) for g in grads)))

    isolated_registry(entry_points=[ep for ep in metadata.entry_points(group="peft_kernel") if ep.name == "lora"],
                      extra_plugins={"recorder": types.SimpleNamespace(peft_kernel_training_step=peft_kernel_training_step)})
    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM",
                                                     init_lora_weights="gaussian"))
    Trainer(model=model, args=_args(tmp_path, "hook", gradient_accumulation_steps=2), train_dataset=TRAIN).train()
    assert seen == [(0, True), (1, True), (2, True), (3, True)]
