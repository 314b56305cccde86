"""loss_and_grads vs one forward on the same SmolLM2 window (issue 17's target: <= 3x).

Times, alternately in one process (1 warm-up each, then --repeats pairs):
  forward   model.forward(ids[:-1])            (the logits perplexity needs)
  backward  loss_and_grads(model, ids)         (the same forward + the backward)
on the first --tokens (512) tokens of data/eval.txt, and reports the medians and
their ratio.  Peak memory of each call: numpy's allocations as tracemalloc sees
them (one untimed extra call each), on top of the loaded model.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_backward.py
"""
import argparse
import os
import statistics
import sys
import time
import tracemalloc

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main():
    from llama_np import Tokenizer, load_model, loss_and_grads
    from refq.fetch import ensure_default_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    folder = a.model or ensure_default_model(progress=False)
    model = load_model(folder)
    with open(os.path.join(REPO, "data", "eval.txt"), encoding="utf-8") as f:
        ids = np.array(Tokenizer(folder).encode(f.read(20_000))[:a.tokens])
    fwd = lambda: model.forward(ids[:-1])                  # noqa: E731
    bwd = lambda: loss_and_grads(model, ids)               # noqa: E731
    fwd(), bwd()
    tf, tb = [], []
    for _ in range(a.repeats):
        t = time.perf_counter(); fwd(); tf.append(time.perf_counter() - t)   # noqa: E702
        t = time.perf_counter(); bwd(); tb.append(time.perf_counter() - t)   # noqa: E702
    peaks = {}
    for what, fn in (("forward", fwd), ("loss_and_grads", bwd)):
        tracemalloc.start()
        fn()
        peaks[what] = tracemalloc.get_traced_memory()[1] / 2 ** 20
        tracemalloc.stop()
    mf, mb = statistics.median(tf), statistics.median(tb)
    print(f"window {len(ids)} tokens, {a.repeats} repeats (medians)")
    print(f"forward         {mf:7.3f} s   peak {peaks['forward']:7.1f} MiB above the model")
    print(f"loss_and_grads  {mb:7.3f} s   peak {peaks['loss_and_grads']:7.1f} MiB above the model")
    print(f"ratio           {mb / mf:7.2f} x")


if __name__ == "__main__":
    main()
