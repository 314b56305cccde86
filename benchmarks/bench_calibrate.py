"""Calibration throughput of one decoder layer vs the float32 matmul rate (issue #19).

    python benchmarks/bench_calibrate.py [--nsamples 128] [--seqlen 512] [--layer 3]
        [--threads N] [--calib-batch B] [--legacy]

Runs in the repository it is started from (PYTHONPATH decides which refq):
--legacy times the loop of refq before issue #19 (per-sample layer.forward with
capture hooks, then per-sample layer.forward again), else refq.calibrate's
passes (default mode: capture pass with the original weights, forward pass).
Prints one JSON line: seconds per stage, the useful FLOPs, the rate, and the
float32 matmul rate numpy reaches in this process at the same thread count
((n*T, 1536) x (1536, 576) and (n*T, 576) x (576, 1536) products).
"""
import argparse
import json
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.getcwd())


def matmul_rate(threads, rows=8192):
    """GFLOP/s of float32 products (rows, 576) x (576, 1536), the best of:
    one product with the BLAS's own threads, and `threads` threads each
    multiplying its own rows single-threaded."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((rows, 576)).astype(np.float32) for _ in range(threads)]
    W = rng.standard_normal((1536, 576)).astype(np.float32)

    def work(x):
        x @ W.T
        return None
    big = np.concatenate(xs)
    big @ W.T
    t = time.perf_counter()
    big @ W.T
    own = time.perf_counter() - t
    best = 1e9
    with threadpool_limits(1):
        with ThreadPoolExecutor(threads) as pool:
            for _ in range(3):
                t = time.perf_counter()
                list(pool.map(work, xs))
                best = min(best, time.perf_counter() - t)
    return 2 * rows * 576 * 1536 * threads / min(best, own) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="workers (new) / BLAS threads (legacy)")
    ap.add_argument("--calib-batch", type=int, default=None)
    ap.add_argument("--legacy", action="store_true")
    ap.add_argument("--shape", default=None, metavar="D,FF,HEADS,KV",
                    help="a random layer of this shape instead of SmolLM2's (e.g. 4096,11008,32,32 "
                         "for LLaMA-7B), random inputs")
    a = ap.parse_args()

    from llama_np import LINEAR_GROUPS, Tokenizer, load_model
    from refq.calibrate import calibration_windows, capture_hessians
    n, T = a.nsamples, a.seqlen
    if a.shape:
        from types import SimpleNamespace

        from llama_np.model import DecoderLayer
        d, ff, nh, nkv = (int(v) for v in a.shape.split(","))
        cfg = SimpleNamespace(hidden_size=d, intermediate_size=ff, num_attention_heads=nh,
                              num_key_value_heads=nkv, head_dim=d // nh, rms_norm_eps=1e-5,
                              rope_theta=10000.0, rope_scaling=None, attention_bias=False)
        rng = np.random.default_rng(0)
        layer = DecoderLayer(cfg, 0, lambda name, shape: (rng.standard_normal(shape, np.float32)
                                                          / np.sqrt(shape[-1])).astype(np.float32))
        X = rng.standard_normal((n, T, d), np.float32)
    else:
        from refq.fetch import resolve_model
        folder = resolve_model(None)
        model, tok = load_model(folder), Tokenizer(folder)
        with open("data/calib.txt", encoding="utf-8") as f:
            ids = tok.encode(f.read())
        windows = calibration_windows(ids, n, T, 0)
        layer = model.layers[a.layer]
        cfg = model.cfg
        X = model.embed(windows)      # (the embeddings as input: only the time is measured)
    d, ff = cfg.hidden_size, cfg.intermediate_size
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if a.legacy:
        hs = list(X)
        pos = np.arange(T)
        Hs = capture_hessians(layer, hs, pos, list(LINEAR_GROUPS))
        t1 = time.perf_counter()
        out = [layer.forward(h, pos) for h in hs]
    else:
        from refq.calibrate import _before, _dense, _Pass, default_batch
        from llama_np.parallel import workers as _workers
        from llama_np.model import rope_cos_sin
        cos, sin = rope_cos_sin(layer.inv_freq, np.arange(T))
        with _workers(a.threads) as (pool, workers):
            run = _Pass(pool, workers, a.calib_batch or default_batch(T), cos, sin)
            acc, _ = run(layer, _dense(layer, _before(LINEAR_GROUPS[3])), X, "h",
                         LINEAR_GROUPS[3], want=LINEAR_GROUPS, write=False)
            Hs = {g: v.mean() for g, v in acc.items()}
            t1 = time.perf_counter()
            run(layer, _dense(layer, _before(None)), X, "h", None)
    t2 = time.perf_counter()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tok_ = n * T
    lin = 2 * tok_ * (d * nh * hd + 2 * d * nkv * hd + nh * hd * d + 3 * d * ff)
    lin_capture = lin - 2 * tok_ * d * ff                # the capture pass stops before down_proj
    attn = 2 * 2 * n * nh * hd * T * (T + 1) / 2         # q kᵀ and p v over the causal half
    hess = tok_ * (3 * d * d + ff * ff)                   # syrk: n² per token (one triangle)
    useful = lin_capture + lin + 2 * attn + hess
    rate = matmul_rate(a.threads)
    gib = 4 * (sum(int(np.prod(lin.shape)) for lin in layer.linears.values()) + X.size) / 2**30
    res = {"legacy": a.legacy, "nsamples": n, "seqlen": T, "threads": a.threads,
           "capture_s": round(t1 - t0, 2), "forward_s": round(t2 - t1, 2),
           "layer_s": round(t2 - t0, 2), "useful_gflop": round(useful / 1e9, 1),
           "gflops": round(useful / 1e9 / (t2 - t0), 1), "matmul_gflops": round(rate, 1),
           "fraction": round(useful / 1e9 / (t2 - t0) / rate, 3),
           "maxrss_mib_before": rss0 // 1024, "maxrss_mib_after": rss1 // 1024,
           "weights_and_inputs_gib": round(gib, 2), "shape": a.shape,
           "load": os.getloadavg()[0]}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
