"""Export time and ONNX Runtime prefill / decode per step of the qaic graph (4-layer hidden-512 Llama).

    HF_HUB_OFFLINE=1 python plugins/qaic/scripts/bench_ort.py [--adapters 0,3,16] [--modes static,cb]
                                                               [--repeats 15] [--threads 2] [--ctx 256]

For each adapter count (LoRA r=8 on q/k/v/o, random weights, saved with HF PEFT) and each graph kind
(``static``: the batch-of-rows graph; ``cb``: continuous batching with a ``batch_index`` input and a
KV cache of ``full_batch_size`` slots), exports once and times, with ONNX Runtime on CPU:

- prefill: one ``[batch, 32]`` chunk into a ``--ctx`` (256) cache (static: batch 4; cb: batch 1 into
  one slot, as the continuous-batching loop runs it), median of ``--repeats`` runs;
- decode: ``[batch, 1]`` steps with the cache fed back (static: batch 4; cb: all 4 slots), median.

Rows use different adapters (``row % slots``). Prints one line per graph; the numbers are medians.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from peft_kernel_qaic import QEffAutoLoraModelForCausalLM  # noqa: E402
from peft_kernel_qaic.export import read_meta  # noqa: E402

BATCH, PREFILL = 4, 32


def llama_h512():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    return AutoModelForCausalLM.from_config(cfg).eval()


def save_adapters(model, n: int, folder: Path) -> list[Path]:
    """``n`` LoRA adapters (r=8 on q/k/v/o, random weights) saved with HF PEFT."""
    from peft import LoraConfig, get_peft_model

    paths = []
    for i in range(n):
        torch.manual_seed(100 + i)
        pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.02)
        pm.save_pretrained(str(folder / f"a{i}"))
        paths.append(folder / f"a{i}")
    return paths


def time_graph(onnx_path: str, threads: int, repeats: int, ctx: int) -> tuple[float, float]:
    meta = read_meta(onnx_path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    cb = bool(meta.get("continuous_batching"))
    slots = len(meta.get("adapter_slots", ["base"]))
    kv = list(meta["kv_shape"])
    kv[0], kv[2] = BATCH, ctx
    past = {n: np.zeros(kv, np.float32) for n in meta["kv_inputs"]}

    def run(ids, pos, rows):
        feeds = {"input_ids": ids, "position_ids": pos, "lora_ids": (rows % slots).reshape(-1, 1),
                 "batch_index": rows.reshape(-1, 1), **past}
        return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in wanted})))

    rows = np.arange(1 if cb else BATCH, dtype=np.int64)
    ids = np.ones((len(rows), PREFILL), np.int64)
    pos = np.tile(np.arange(PREFILL, dtype=np.int64), (len(rows), 1))
    prefill = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = run(ids, pos, rows)
        prefill.append(time.perf_counter() - t)
    past = {n: out[f"{n}_RetainedState"] for n in past}
    rows = np.arange(BATCH, dtype=np.int64)
    decode = []
    for s in range(2 * repeats):
        t = time.perf_counter()
        out = run(np.ones((BATCH, 1), np.int64), np.full((BATCH, 1), PREFILL + s, np.int64), rows)
        decode.append(time.perf_counter() - t)
        past = {n: out[f"{n}_RetainedState"] for n in past}
    return float(np.median(prefill)), float(np.median(decode))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapters", default="0,3,16")
    parser.add_argument("--modes", default="static,cb")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; ORT threads {args.threads}")
    model = llama_h512()
    tmp = Path(tempfile.mkdtemp(prefix="qaic-bench-"))
    for n in (int(x) for x in args.adapters.split(",")):
        paths = save_adapters(model, n, tmp / f"adapters{n}")
        for mode in args.modes.split(","):
            kwargs = {"continuous_batching": True} if mode == "cb" else {}
            qeff = QEffAutoLoraModelForCausalLM.from_pretrained(model, **kwargs)
            for path in paths:
                qeff.load_adapter(path, path.name)
            shape = {"full_batch_size": BATCH, "batch_size": 1} if mode == "cb" else {"batch_size": BATCH}
            t = time.perf_counter()
            onnx_path = qeff.export(tmp / f"export-{mode}-{n}", prefill_seq_len=PREFILL, ctx_len=args.ctx, **shape)
            export_s = time.perf_counter() - t
            pre, dec = time_graph(onnx_path, args.threads, args.repeats, args.ctx)
            pre_rows = 1 if mode == "cb" else BATCH
            print(f"{mode:6s} adapters={n:2d}  export {export_s:5.2f} s  prefill [{pre_rows}x{PREFILL}] {1000 * pre:7.2f} ms  "
                  f"decode [{BATCH}x1] {1000 * dec:6.2f} ms/step  (ctx {args.ctx}, medians)", flush=True)


if __name__ == "__main__":
    main()
