"""Time prefill and decode of exported qaic graphs with ONNX Runtime alone (numpy + onnxruntime).

    python plugins/qaic/scripts/ort_decode_bench.py EXPORT_FOLDER [EXPORT_FOLDER ...]

Each EXPORT_FOLDER holds model.onnx and qaic_export.json (written by ``export()``). Feeds the static
shapes the device runs (prefill chunk, then decode steps with the KV cache fed back) and prints the
median per-step time for several batch sizes and thread counts.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def bench(folder: Path, batch: int, threads: int, ctx: int = 256, prefill: int = 32, steps: int = 32) -> tuple[float, float]:
    meta = json.loads((folder / "qaic_export.json").read_text())
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    kv = list(meta["kv_shape"])
    kv[0], kv[2] = batch, ctx
    past = {n: np.zeros(kv, np.float32) for n in meta["kv_inputs"]}
    slots = len(meta.get("adapter_slots", ["base"]))
    lora = (np.arange(batch) % slots).reshape(batch, 1).astype(np.int64)

    def run(ids, pos):
        feeds = {"input_ids": ids, "position_ids": pos, "lora_ids": lora, **past}
        out = sess.run(None, {k: v for k, v in feeds.items() if k in wanted})
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, out))

    ids = np.ones((batch, prefill), np.int64)
    pos = np.tile(np.arange(prefill), (batch, 1)).astype(np.int64)
    t = time.perf_counter()
    out = run(ids, pos)
    prefill_s = time.perf_counter() - t
    past = {n: out[f"{n}_RetainedState"] for n in past}
    times = []
    for s in range(steps):
        t = time.perf_counter()
        out = run(np.ones((batch, 1), np.int64), np.full((batch, 1), prefill + s, np.int64))
        times.append(time.perf_counter() - t)
        past = {n: out[f"{n}_RetainedState"] for n in past}
    return prefill_s, float(np.median(times))


def main() -> None:
    for arg in sys.argv[1:]:
        folder = Path(arg)
        meta = json.loads((folder / "qaic_export.json").read_text())
        slots = meta.get("adapter_slots", ["base"])
        for threads in (2, 8):
            for batch in (1, 4, 8):
                pre, dec = bench(folder, batch, threads)
                print(f"{folder.name:40s} slots={len(slots)} threads={threads} batch={batch}: prefill(32) {1000 * pre:7.1f} ms, "
                      f"decode {1000 * dec:6.2f} ms/step")


if __name__ == "__main__":
    main()
