"""EVA initialisation (``init_lora_weights="eva"``) against HF PEFT, run on the same tiny llama and
calibration batches: the same A rows (HF fixes the SVD signs: largest entry positive, and seeds
its randomised SVD, so no sign freedom is left), the same ``rank_pattern`` / ``alpha_pattern``,
and adapters that cross-load both ways."""

from __future__ import annotations

import tempfile
import warnings

import pytest
import torch

import peft_kernel
from peft_kernel.plugin_api import ConfigError
from peft_kernel_lora.eva_config import EvaConfig
from peft_kernel_testing.models import make_model, output_tensor

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
ATOL = 5e-5  # float32 SVDs of the same data


def _batches(labels: bool = False, count: int = 6) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(count):
        ids = torch.randint(1, 64, (4, 12), generator=g)
        mask = torch.ones(4, 12, dtype=torch.long)
        mask[0, -3:] = 0
        batch = {"input_ids": ids, "attention_mask": mask}
        if labels:
            batch["labels"] = ids.clone()
            batch["labels"][:, :4] = -100
        batches.append(batch)
    return batches


def _eva(lib, labels: bool = False, r: int = 4, targets: list[str] = TARGETS, **eva_kwargs):
    torch.manual_seed(0)
    model = make_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = lib.LoraConfig(r=r, lora_alpha=8, target_modules=targets, init_lora_weights="eva",
                                eva_config=lib.EvaConfig(**eva_kwargs))
        peft_model = lib.get_peft_model(model, config)
        lib.initialize_lora_eva_weights(peft_model, _batches(labels), show_progress_bar=False)
    return peft_model


def _lora_a(model) -> dict[str, torch.Tensor]:
    return {k.replace(".default", ""): v.detach() for k, v in model.state_dict().items() if "lora_A" in k}


@pytest.mark.parametrize("labels, eva_kwargs", [
    (False, {}),
    (True, {}),
    (True, {"use_label_mask": False}),
    (False, {"rho": 1.0}),
    (False, {"rho": 1.5, "tau": 0.95, "adjust_scaling_factors": False}),
    # layers left without rank lose their adapter (HF lists the kept ones in target_modules)
    (False, {"r": 1, "rho": 6.0, "targets": ["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}),
])
def test_matches_hf(labels: bool, eva_kwargs: dict) -> None:
    hf, ours = _eva(peft, labels, **eva_kwargs), _eva(peft_kernel, labels, **eva_kwargs)
    hf_config, our_config = hf.peft_config["default"], ours.peft_config["default"]
    assert our_config.rank_pattern == hf_config.rank_pattern
    assert sorted(our_config.target_modules) == sorted(hf_config.target_modules)
    assert our_config.alpha_pattern == pytest.approx(hf_config.alpha_pattern, abs=1e-5)
    hf_a, our_a = _lora_a(hf), _lora_a(ours)
    assert hf_a.keys() == our_a.keys()
    for key, value in hf_a.items():
        torch.testing.assert_close(our_a[key], value, atol=ATOL, rtol=0)
    assert all(float(v.abs().max()) == 0 for k, v in ours.state_dict().items() if "lora_B" in k)


@pytest.mark.parametrize("sparse_batch", [False, True])
def test_get_eva_state_dict_matches_hf_and_initialises_from_it(sparse_batch: bool) -> None:
    """``sparse_batch``: one batch keeps fewer positions than the layers have directions; it is
    skipped for them (HF prints a note, peft-kernel logs a warning)."""
    batches = _batches()
    if sparse_batch:
        batches[2]["attention_mask"][:] = 0
        batches[2]["attention_mask"][0, :3] = 1
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_model = peft.get_peft_model(make_model("llama"), peft.LoraConfig(
            r=4, target_modules=TARGETS, init_lora_weights="eva", eva_config=peft.EvaConfig()))
    hf_state = peft.get_eva_state_dict(hf_model, batches, show_progress_bar=False)
    torch.manual_seed(0)
    ours = peft_kernel.get_peft_model(make_model("llama"), peft_kernel.LoraConfig(
        r=4, target_modules=TARGETS, init_lora_weights="eva", eva_config=peft_kernel.EvaConfig()))
    state = peft_kernel.get_eva_state_dict(ours, batches, show_progress_bar=False)
    assert list(state) == list(hf_state)
    for key, value in hf_state.items():
        torch.testing.assert_close(state[key], value, atol=ATOL, rtol=0)
    peft_kernel.initialize_lora_eva_weights(ours, eva_state_dict=hf_state)
    for key, value in hf_state.items():
        torch.testing.assert_close(ours.get_submodule(key).lora_A["default"].weight, value.float())


def test_plain_model_with_config() -> None:
    """``get_eva_state_dict`` on a model without adapters, given the config (HF's keys: module names)."""
    config = peft_kernel.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="eva")
    torch.manual_seed(0)
    state = peft_kernel.get_eva_state_dict(make_model("llama"), _batches(), peft_config=config,
                                           show_progress_bar=False)
    torch.manual_seed(0)
    hf_state = peft.get_eva_state_dict(make_model("llama"), _batches(), peft_config=peft.LoraConfig(
        r=4, target_modules=TARGETS, init_lora_weights="eva", eva_config=peft.EvaConfig()), show_progress_bar=False)
    assert list(state) == list(hf_state)
    for key, value in hf_state.items():
        torch.testing.assert_close(state[key], value, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind, targets, task_type", [
    ("gpt2", ["c_attn", "c_fc", "c_proj"], None),  # transformers' Conv1D
    ("bert", ["query", "value", "intermediate.dense"], "SEQ_CLS"),
])
def test_other_models_match_hf(kind: str, targets: list[str], task_type: str | None) -> None:
    results = []
    for lib in (peft, peft_kernel):
        torch.manual_seed(0)
        model = lib.get_peft_model(make_model(kind), lib.LoraConfig(r=4, target_modules=targets, task_type=task_type,
                                                                     init_lora_weights="eva"))
        lib.initialize_lora_eva_weights(model, _batches(), show_progress_bar=False)
        results.append((model.peft_config["default"].rank_pattern, _lora_a(model)))
    (hf_ranks, hf_a), (ranks, ours) = results
    assert ranks == hf_ranks
    for key, value in hf_a.items():
        torch.testing.assert_close(ours[key], value, atol=ATOL, rtol=0)


def test_layer_inputs_without_token_positions_are_refused() -> None:
    """BERT's pooler sees one row per sequence, not one per token (HF PEFT fails there too)."""
    torch.manual_seed(0)
    model = peft_kernel.get_peft_model(make_model("bert"), peft_kernel.LoraConfig(
        r=4, target_modules=["pooler.dense"], task_type="SEQ_CLS", init_lora_weights="eva"))
    with pytest.raises(ValueError, match="pooler.dense.*prepare_layer_inputs_fn"):
        peft_kernel.initialize_lora_eva_weights(model, _batches(), show_progress_bar=False)


def _train_b(model) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)


@pytest.mark.parametrize("direction", ["hf_to_ours", "ours_to_hf"])
def test_saved_adapter_cross_loads(direction: str) -> None:
    source_lib, target_lib = (peft, peft_kernel) if direction == "hf_to_ours" else (peft_kernel, peft)
    source = _eva(source_lib, labels=True)
    _train_b(source)
    ids = _batches()[0]
    with tempfile.TemporaryDirectory() as tmp:
        source.save_pretrained(tmp)
        torch.manual_seed(0)
        loaded = target_lib.PeftModel.from_pretrained(make_model("llama"), tmp)
        with torch.no_grad():
            expected = output_tensor(source(**ids))
            got = output_tensor(loaded(**ids))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert loaded.peft_config["default"].rank_pattern == source.peft_config["default"].rank_pattern


def test_eva_config_validation_and_warnings() -> None:
    with pytest.raises(ConfigError, match="rho"):
        EvaConfig(rho=0.5)
    with pytest.raises(ConfigError, match="tau"):
        EvaConfig(tau=1.5)
    with pytest.raises(ConfigError, match="unknown keys"):
        peft_kernel.LoraConfig(init_lora_weights="eva", eva_config={"rho": 2.0, "bogus": 1})
    with pytest.warns(UserWarning, match="Using default EVA config"):
        config = peft_kernel.LoraConfig(init_lora_weights="eva")
    assert config.eva_config == {f: getattr(peft.EvaConfig(), f) for f in config.eva_config}
    with pytest.warns(UserWarning, match="will be ignored"):
        peft_kernel.LoraConfig(eva_config=peft_kernel.EvaConfig())


def test_refusals() -> None:
    torch.manual_seed(0)
    plain = peft_kernel.get_peft_model(make_model("llama"), peft_kernel.LoraConfig(r=4, target_modules=TARGETS))
    with pytest.raises(ValueError, match="init_lora_weights"):
        peft_kernel.initialize_lora_eva_weights(plain, _batches())
    eva = peft_kernel.get_peft_model(make_model("llama"), peft_kernel.LoraConfig(
        r=4, target_modules=TARGETS, init_lora_weights="eva"))
    with pytest.raises(ValueError, match="dataloader"):
        peft_kernel.initialize_lora_eva_weights(eva)
    with pytest.raises(ValueError, match="empty"):
        peft_kernel.initialize_lora_eva_weights(eva, [])


def test_whiten() -> None:
    """``whiten`` divides each direction by the square root of its singular value. HF PEFT 0.21.2
    does so in place on a tensor that layers with identical inputs share (q_proj / v_proj here), so
    those get divided twice (by the singular value itself); peft-kernel whitens every layer once.
    Layers without a twin match HF; the twins match the once-whitened oracle."""
    hf, ours = _eva(peft, whiten=True), _eva(peft_kernel, whiten=True)
    plain = _lora_a(_eva(peft_kernel))
    assert ours.peft_config["default"].rank_pattern == hf.peft_config["default"].rank_pattern
    hf_a, our_a = _lora_a(hf), _lora_a(ours)
    for key, value in hf_a.items():
        if "q_proj" in key or "v_proj" in key:
            # twins: HF's rows are V / S, ours V / sqrt(S) (V: the unwhitened unit rows)
            ours_scale, hf_scale = (our_a[key] * plain[key]).sum(1), (value * plain[key]).sum(1)
            torch.testing.assert_close(our_a[key], ours_scale[:, None] * plain[key], atol=ATOL, rtol=1e-4)
            torch.testing.assert_close(ours_scale**2, hf_scale, atol=1e-6, rtol=1e-4)
        else:
            torch.testing.assert_close(our_a[key], value, atol=ATOL, rtol=1e-4)


def test_second_adapter_and_mixed_batches() -> None:
    """EVA on a second adapter leaves the first alone; mixed batches equal per-row runs afterwards
    (the adapter's layers are rebuilt at their new ranks after stacks were cached)."""
    torch.manual_seed(0)
    model = peft_kernel.get_peft_model(make_model("llama"), peft_kernel.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    batch = _batches()[0]
    names = ["default", "eva", "default", "eva"]
    model(**batch, adapter_names=["default"] * 4)
    before = {k: v.clone() for k, v in model.state_dict().items() if ".default" in k}
    model.add_adapter("eva", peft_kernel.LoraConfig(r=2, target_modules=["q_proj", "up_proj", "down_proj"],
                                                   init_lora_weights="eva"))
    peft_kernel.initialize_lora_eva_weights(model, _batches(), adapter_name="eva", show_progress_bar=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    _train_b(model)
    model.eval()
    with torch.no_grad():
        mixed = output_tensor(model(**batch, adapter_names=names))
        rows = []
        for i, name in enumerate(names):
            model.set_adapter(name)
            rows.append(output_tensor(model(**{k: v[i:i + 1] for k, v in batch.items()})))
    torch.testing.assert_close(mixed, torch.cat(rows), atol=1e-5, rtol=0)
