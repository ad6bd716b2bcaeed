"""Measure the qaic backend on CPU: export time, ORT vs PyTorch logits, decode time per step.

    HF_HUB_OFFLINE=1 python plugins/qaic/scripts/measure.py

Builds tiny models from configs (no downloads), saves three LoRA adapters of different
ranks / targets / scalings with HF PEFT, exports one multi-LoRA graph, runs a mixed batch on
ONNX Runtime and verifies it against PyTorch.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
from qaic_testing import make_tokenizer, save_hf_adapters, tiny_model  # noqa: E402

from peft_kernel_qaic import QEffAutoLoraModelForCausalLM  # noqa: E402

PROMPTS = ["what is 12+30?", "hello", "def add(a, b): return a + b", "tell me a story about a cat"]
MAPPING = ["gsm8k", "base", "code", "chat"]


def bigger_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    return AutoModelForCausalLM.from_config(cfg).eval()


def run(name, model, tmp, tok, ctx_len=64, gen=16, with_adapters=True, std=0.3):
    qeff = QEffAutoLoraModelForCausalLM.from_pretrained(model)
    if with_adapters:
        for n, p in save_hf_adapters(model, tmp / f"{name}-adapters", std=std).items():
            qeff.load_adapter(p, n)
    mapping = MAPPING if with_adapters else ["base"] * len(PROMPTS)
    t = time.perf_counter()
    qeff.export(tmp / "export", batch_size=4, prefill_seq_len=16, ctx_len=ctx_len)
    export_s = time.perf_counter() - t
    qeff.generate(tok, PROMPTS, mapping, generation_len=2, runtime="onnxruntime")  # warm-up
    res = qeff.generate(tok, PROMPTS, mapping, generation_len=gen, runtime="onnxruntime")
    report = qeff.verify(tok, PROMPTS, mapping, generation_len=8)
    size = sum(f.stat().st_size for f in qeff.onnx_path.parent.glob("*")) / 1e6
    print(f"{name:28s} export {export_s:5.2f}s  onnx {size:6.1f} MB  prefill {1000 * res.perf['prefill_s']:6.1f} ms  "
          f"decode {res.perf.get('decode_ms_per_step', 0):6.2f} ms/step (batch 4)  "
          f"max|ORT-PyTorch| {report.worst:.1e} (max|logit| {max(report.max_abs_logit):.0f})  tokens {'match' if report.ok else 'DIFFER'}")
    return qeff


def main():
    torch.set_num_threads(2)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (timings scale with it)")
    tok = make_tokenizer()
    tmp = Path(tempfile.mkdtemp(prefix="qaic-measure-"))
    for arch in ("llama", "mistral", "qwen2"):
        run(f"tiny {arch} + 3 adapters", tiny_model(arch), tmp, tok)
    big = bigger_llama()
    run("llama h512 L4 no adapters", big, tmp, tok, ctx_len=128, with_adapters=False)
    # LoRA weights ~N(0, 0.05): with 0.3 the h512 residual stream reaches ~1e5 and float32 rounding
    # alone (PyTorch HF PEFT vs PyTorch reference) differs by ~1e-5 in the logits
    qeff = run("llama h512 L4 + 3 adapters", big, tmp, tok, ctx_len=128, std=0.05)
    extra = save_hf_adapters(big, tmp / "extra", specs={"late": dict(r=16, target_modules=["k_proj", "up_proj"])})
    qeff.load_adapter(extra["late"], "late")
    t = time.perf_counter()
    qeff.export()
    print(f"re-export after adding a 4th adapter (h512 L4): {time.perf_counter() - t:.2f}s; unchanged re-export: ", end="")
    t = time.perf_counter()
    qeff.export()
    print(f"{time.perf_counter() - t:.3f}s (hash check only)")


if __name__ == "__main__":
    main()
