"""AQLM block fine-tuning on the first --layers decoder layers of SmolLM2, from ONE quantization.

The first L layers are AQLM-quantized once (`refq.calibrate.quantize_layers`,
--nsamples windows of --seqlen tokens of data/calib.txt, seed 0, AQLM 2x8 g8
with --max-iters), the rest stay dense.  Then, from copies of that same
quantized model, each fine-tuning setting (--lrs) re-runs layer by layer: layer
l's inputs are the calibration windows through the (fine-tuned) layers < l,
its targets the unquantized layer l on those inputs, exactly as
`refq quantize --finetune` does.  Reported per setting: perplexity on the first
--eval-tokens tokens of data/eval.txt (ctx 512), fine-tuning seconds, and per
layer the MSE history (epoch 0 = before) and the float32 (unrounded) MSE.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 \\
        python benchmarks/bench_finetune_layer.py --layers 1 --nsamples 8 --max-iters 3 --epochs 8
"""
import argparse
import copy
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main():
    import numpy as np

    from llama_np import Tokenizer, load_model, perplexity
    from refq.api import quantize_weight
    from refq.calibrate import calibration_windows, quantize_layers
    from refq.fetch import ensure_default_model
    from refq.finetune import DEFAULTS as FT, finetune_layer

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-iters", type=int, default=3)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--lrs", type=float, nargs="*", default=[1e-5, 1e-4, 1e-3])
    ap.add_argument("--epochs", type=int, default=FT["epochs"])
    a = ap.parse_args()
    folder = ensure_default_model(progress=False)
    tok = Tokenizer(folder)
    with open(os.path.join(REPO, "data", "calib.txt"), encoding="utf-8") as f:
        windows = calibration_windows(tok.encode(f.read()), a.nsamples, a.seqlen, 0)
    with open(os.path.join(REPO, "data", "eval.txt"), encoding="utf-8") as f:
        eval_ids = tok.encode(f.read())[:a.eval_tokens]
    print(json.dumps({"setting": vars(a), "load": os.getloadavg()}), flush=True)
    dense = load_model(folder)
    model = load_model(folder)
    qs = {}

    def quantize(n, W, H):
        qs[n] = quantize_weight(W, H, "aqlm", name=n, max_iters=a.max_iters)
        return qs[n]
    tick = time.perf_counter()
    all_layers = model.layers
    model.layers = all_layers[:a.layers]
    quantize_layers(model, windows, quantize)
    model.layers = all_layers
    q_secs = time.perf_counter() - tick
    nw = sum(q.shape[0] * q.shape[1] for q in qs.values())
    bpw = sum(q.bits_per_weight * q.shape[0] * q.shape[1] for q in qs.values()) / nw
    ppl, n, _ = perplexity(model, eval_ids, 512)
    print(json.dumps({"variant": "aqlm-2x8g8 (no fine-tuning)", "ppl": ppl, "eval_tokens": n,
                      "aqlm_seconds": round(q_secs, 1), "bits_per_weight": bpw,
                      "load": os.getloadavg()}), flush=True)
    pos = np.arange(a.seqlen)
    for lr in a.lrs:
        m = copy.deepcopy(model)
        hs = [m.embed(w) for w in windows]
        record, tick = [], time.perf_counter()
        for i in range(a.layers):
            targets = [dense.layers[i].forward(h, pos) for h in hs]   # unquantized layer i
            info = finetune_layer(m.layers[i], hs, targets, pos, dict(FT, lr=lr, epochs=a.epochs))
            record.append({"layer": i, "mse_history": info["mse_history"],
                           "mse_float32": info["mse_float32"], "epochs": info["epochs"],
                           "seconds": round(info["seconds"], 1)})
            hs = [m.layers[i].forward(h, pos) for h in hs]
        ft_secs = time.perf_counter() - tick
        bpw_ft = sum(q.bits_per_weight * q.shape[0] * q.shape[1]
                     for i in range(a.layers) for q in m.layers[i].linears.values()) / nw
        ppl, n, _ = perplexity(m, eval_ids, 512)
        print(json.dumps({"variant": f"aqlm-2x8g8 + finetune lr {lr:g}", "ppl": ppl,
                          "finetune_seconds": round(ft_secs, 1), "bits_per_weight": bpw_ft,
                          "layers": record, "load": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()
