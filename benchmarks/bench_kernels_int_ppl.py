"""Perplexity through the integer-activation kernel ("cpu-int") vs the exact one ("cpu").

    python benchmarks/bench_kernels_int_ppl.py [--max-tokens 512] [--ctx 256] CHECKPOINT...

`refq eval` multiplies whole windows by dense decoded weights (llama_np.generate.
final_hidden: prefill_weight), where "cpu-int" does not apply; decoding multiplies
one token at a time. To measure what the int16 activations do to the model, this
script runs each window through Llama.forward with the BLAS thresholds raised, so
that EVERY linear's product goes through refq.kernels.matmul's small-batch kernel
(or the fused q/k/v, gate/up kernel call), for both kernels, each checkpoint and
kernel in its own process. It counts the kernel calls (uniform_apply for "cpu",
uniform_int_apply for "cpu-int") to show that they ran, and prints, per
(checkpoint, kernel), that perplexity next to `refq eval`'s on the same windows
(ppl_eval: the dense path, identical for both kernels), then the relative change
cpu-int vs cpu.
"""
import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, math, sys, time
sys.path.insert(0, {repo!r})
import refq.kernels as K
import refq.kernels.cpu as kc
K.BLAS_MIN_BATCH = 10 ** 9                      # every product through the small-batch kernel
for fn in (kc.uniform_cpu, kc.uniform_int_cpu):
    fn.blas_min_batch = lambda q: 10 ** 9
calls = {{"uniform_apply": 0, "uniform_int_apply": 0}}
def counted(name):
    inner = getattr(kc, name)
    def f(st, x2):
        calls[name] += 1
        return inner(st, x2)
    return f
for name in calls:
    setattr(kc, name, counted(name))
from llama_np import perplexity
from llama_np.generate import eval_windows, log_softmax_nll
from refq.cli import read_text
from refq.loading import load_for_inference
model, tok, _ = load_for_inference({model!r}, kernel={kernel!r})
ids = tok.encode(read_text({text!r}))[:{max_tokens}]
t0 = time.perf_counter()
nll, n = 0.0, 0
for w, first in eval_windows(ids, {ctx}):
    logits = model.forward(w[:-1])              # each linear: refq.kernels, not prefill_weight
    nll += float(log_softmax_nll(logits[first:], w[first + 1:]).sum())
    n += len(w) - 1 - first
seconds = time.perf_counter() - t0
ppl_eval = perplexity(model, ids, {ctx})[0]
print(json.dumps({{"ppl": math.exp(nll / n), "ppl_eval": ppl_eval, "tokens": n,
                  "kernel_calls": calls, "seconds": round(seconds, 1)}}))
"""


def main():
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--text", default=None)
    a = p.parse_args()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = a.text or os.path.join(repo, "data", "eval.txt")
    for m in a.models:
        res = {}
        for kernel in ("cpu", "cpu-int"):
            code = CHILD.format(repo=repo, model=m, kernel=kernel, text=text,
                                max_tokens=a.max_tokens, ctx=a.ctx)
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if r.returncode:
                print(r.stderr[-2000:], file=sys.stderr)
                break
            res[kernel] = json.loads(r.stdout.strip().splitlines()[-1])
            print(json.dumps({"model": m, "kernel": kernel, **res[kernel]}), flush=True)
        if len(res) == 2:
            d = res["cpu-int"]["ppl"] / res["cpu"]["ppl"] - 1
            print(json.dumps({"model": m, "relative_ppl_change": d}), flush=True)


if __name__ == "__main__":
    main()
