"""VeLoRA (``LoraConfig.velora_config``) against HF ``peft``: the conformance suite (the forward is
LoRA's, the projection buffer is saved), the compressed-activation gradients and the projection
updates of a training step, options, bad configs."""

from __future__ import annotations

import pytest
import torch

import peft_kernel as pk
from peft_kernel.plugin_api import UnsupportedFeatureError
from peft_kernel_testing import ConformanceCase, conformance_suite
from peft_kernel_testing.hf_oracle import max_abs_diff, perturb
from peft_kernel_testing.models import make_inputs, make_model, output_tensor

peft = pytest.importorskip("peft")

TOL = 1e-5
LIBS = {"ours": pk, "hf": peft}


def lora(**kwargs):
    return lambda: pk.LoraConfig(**{"r": 4, "lora_alpha": 8, **kwargs})


CASES = [
    ConformanceCase("mlp", lora(target_modules=["lin0", "lin1"], velora_config=pk.VeloraConfig(num_groups=2)),
                    id="mlp-velora"),
    ConformanceCase("llama", lora(target_modules=["q_proj", "v_proj", "down_proj"],
                                  velora_config=pk.VeloraConfig(num_groups=4, init_type="random")), id="llama-velora-random"),
    ConformanceCase("gpt2", lora(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                 velora_config=pk.VeloraConfig(num_groups=3, scale=2.0)), id="gpt2-velora-padded"),
]

TestVeloraConformance = conformance_suite(CASES)

SETUPS = {"mlp": ["lin0", "lin1"], "llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def build(lib: str, kind: str, velora: dict, dtype: torch.dtype = torch.float32, **lora):
    module = LIBS[lib]
    extra = {"fan_in_fan_out": True} if kind == "gpt2" else {}
    config = module.LoraConfig(r=4, lora_alpha=8, target_modules=SETUPS[kind], **extra, **lora,
                               velora_config=module.VeloraConfig(**velora))
    torch.manual_seed(3)  # init_type="random" draws its vector at creation
    model = module.get_peft_model(make_model(kind).to(dtype), config)
    perturb(model, 5)  # B non-zero: lora_A gets gradients
    return model


def step(model, kind: str, seed: int):
    """One training forward/backward; the gradients of the trainable tensors and of the input embeddings."""
    model.train()
    for p in model.parameters():
        p.grad = None
    inputs = make_inputs(kind, seed=seed)
    torch.manual_seed(seed)  # dropout masks
    if kind == "mlp":
        x = inputs["x"].requires_grad_(True)
        output_tensor(model(x=x)).pow(2).sum().backward()
        grad_in = x.grad
    else:
        embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
        output_tensor(model(inputs_embeds=embeds)).pow(2).sum().backward()
        grad_in = embeds.grad
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in model.named_buffers() if "velora" in n}
    return grads, buffers, grad_in


@pytest.mark.parametrize("kind,velora,lora", [
    ("llama", {"num_groups": 4}, {"dtype": torch.bfloat16}),
    ("mlp", {"num_groups": 2}, {}),
    ("mlp", {"num_groups": 3, "scale": 0.5, "init_type": "batch_average_once"}, {}),
    ("llama", {"num_groups": 4}, {"lora_dropout": 0.2}),
    ("llama", {"num_groups": 64, "init_type": "random"}, {"use_rslora": True}),
    ("gpt2", {"num_groups": 5, "scale": 2.0}, {"lora_bias": True}),
], ids=["llama-bf16-base", "mlp", "mlp-padded-once", "llama-dropout", "llama-random", "gpt2-bias"])
def test_training_gradients_and_projection_equal_hf(kind, velora, lora):
    ours, hf = build("ours", kind, velora, **lora), build("hf", kind, velora, **lora)
    for seed in (1, 2):  # batch_average re-projects on the second step, batch_average_once does not
        (g_ours, b_ours, x_ours), (g_hf, b_hf, x_hf) = step(ours, kind, seed), step(hf, kind, seed)
        assert sorted(g_ours) == sorted(g_hf) and sorted(b_ours) == sorted(b_hf)
        for name, grad in g_hf.items():
            assert max_abs_diff(g_ours[name], grad) <= TOL, (seed, name)
        for name, buffer in b_hf.items():
            assert max_abs_diff(b_ours[name], buffer) <= TOL, (seed, name)
        assert max_abs_diff(x_ours, x_hf) <= TOL


def test_lora_a_gradient_is_approximate_and_the_rest_exact():
    """Against plain LoRA with the same weights: lora_A's gradient differs, lora_B's and the input's do not."""
    velora = build("ours", "mlp", {"num_groups": 2})
    plain = pk.get_peft_model(make_model("mlp"), pk.LoraConfig(r=4, lora_alpha=8, target_modules=SETUPS["mlp"]))
    plain.load_state_dict(velora.state_dict(), strict=False)
    (g_v, _, x_v), (g_p, _, x_p) = step(velora, "mlp", 1), step(plain, "mlp", 1)
    assert max_abs_diff(x_v, x_p) <= TOL
    for name in g_p:
        assert (max_abs_diff(g_v[name], g_p[name]) > 1e-3) == ("lora_A" in name), name


def test_projection_is_the_normalised_group_mean_and_eval_leaves_it():
    model = build("ours", "mlp", {"num_groups": 2})
    layer = model.base_model.model.lin1
    assert torch.equal(layer.lora_velora_embed["default"], torch.zeros(8))
    model.eval()
    with torch.no_grad():
        model(**make_inputs("mlp"))
    assert torch.equal(layer.lora_velora_embed["default"], torch.zeros(8))
    seen = {}
    layer.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach()))
    step(model, "mlp", 1)
    mean = seen["x"].reshape(-1, 2, 8).mean(dim=(0, 1))
    assert max_abs_diff(layer.lora_velora_embed["default"], mean / mean.norm()) <= 1e-6


def test_bad_configs_raise_named_errors_like_hf():
    for bad, message in (({"num_groups": 0}, "num_groups"), ({"scale": -1.0}, "scale"), ({"init_type": "mean"}, "init_type")):
        with pytest.raises(pk.ConfigError, match=message):
            pk.VeloraConfig(**bad)
        with pytest.raises(ValueError, match=message):
            peft.VeloraConfig(**bad)
    with pytest.raises(pk.ConfigError, match="unknown keys.*'groups'"):
        pk.LoraConfig(velora_config={"groups": 2})
    with pytest.raises(pk.ConfigError, match="use_dora"):
        pk.LoraConfig(velora_config=pk.VeloraConfig(), use_dora=True)
    for kind, target in (("conv2d", "conv0"), ("embedding", "emb")):
        with pytest.raises(UnsupportedFeatureError, match="VeLoRA supports nn.Linear"):
            pk.get_peft_model(make_model(kind), pk.LoraConfig(target_modules=[target], velora_config=pk.VeloraConfig()))


def test_config_round_trip_equals_hf():
    ours = pk.LoraConfig(velora_config=pk.VeloraConfig(num_groups=8, init_type="random"))
    hf = peft.LoraConfig(velora_config=peft.VeloraConfig(num_groups=8, init_type="random"))
    assert ours.to_dict()["velora_config"] == hf.to_dict()["velora_config"]
    assert pk.PeftConfig.from_dict(ours.to_dict()).velora_config == ours.velora_config
