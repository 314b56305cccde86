"""The gradient-based halves of issue 17 on SmolLM2, on a stated subset (a loaded machine):

  squeezellm --bits 3|4 --sensitivity hessian_diag|fisher
  aqlm 2x8 g8 with and without --finetune
  slim (its defaults: 4-bit 2:4 wanda, rank 0.1 min(out, in), fp16 adapters) with and
  without --finetune (adapter fine-tuning), at several learning rates

Only the first --layers decoder layers are quantized (the rest stay dense), with
--nsamples windows of --seqlen tokens of data/calib.txt (seed 0), through the same
refq.calibrate.quantize_layers as `refq quantize`; the Fisher is computed on the
whole unquantized model from the same windows.  Perplexity: the first
--eval-tokens tokens of data/eval.txt, ctx 512.  One JSON line per variant
(printed as soon as it is done): ppl, seconds (quantization, Fisher included;
fine-tuning included), fisher_seconds, finetune record, bits per weight.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=1 \\
        python benchmarks/bench_grad_methods.py --layers 2 --nsamples 8 --eval-tokens 4096
"""
import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

VARIANTS = {
    "squeezellm-w3-hessian_diag": ("squeezellm", dict(bits=3, sensitivity="hessian_diag"), None),
    "squeezellm-w3-fisher": ("squeezellm", dict(bits=3, sensitivity="fisher"), None),
    "squeezellm-w4-hessian_diag": ("squeezellm", dict(bits=4, sensitivity="hessian_diag"), None),
    "squeezellm-w4-fisher": ("squeezellm", dict(bits=4, sensitivity="fisher"), None),
    "aqlm-2x8g8": ("aqlm", dict(), None),
    "aqlm-2x8g8-finetune": ("aqlm", dict(), {}),                  # official lr 1e-5
    "aqlm-2x8g8-finetune-lr1e-4": ("aqlm", dict(), {"lr": 1e-4}),
    "slim": ("slim", dict(), None),                                # 4-bit 2:4 wanda, fp16 adapters
    "slim-finetune": ("slim", dict(), {}),                         # official lr 5e-5
    "slim-finetune-lr1e-4": ("slim", dict(), {"lr": 1e-4}),
    "slim-finetune-lr1e-3": ("slim", dict(), {"lr": 1e-3}),
    "slim-a4": ("slim", dict(adapter_bits=4), None),              # 4-bit adapters, groups of 128
    "slim-a4-finetune-lr1e-3": ("slim", dict(adapter_bits=4), {"lr": 1e-3}),
}


def main():
    from llama_np import Tokenizer, load_model, perplexity
    from refq.api import quantize_weight, validate_options
    from refq.calibrate import calibration_windows, quantize_layers
    from refq.fetch import ensure_default_model
    from refq.finetune import BLOCKS, make_layer_hook
    from refq.fisher import fisher_context

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--finetune-epochs", type=int, default=None, help="default: the method's")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    a = ap.parse_args()
    folder = ensure_default_model(progress=False)
    tok = Tokenizer(folder)
    with open(os.path.join(REPO, "data", "calib.txt"), encoding="utf-8") as f:
        windows = calibration_windows(tok.encode(f.read()), a.nsamples, a.seqlen, 0)
    with open(os.path.join(REPO, "data", "eval.txt"), encoding="utf-8") as f:
        eval_ids = tok.encode(f.read())[:a.eval_tokens]
    print(json.dumps({"setting": vars(a), "uptime": os.getloadavg()}), flush=True)
    for name in a.variants:
        method, opts, ft = VARIANTS[name]
        model = load_model(folder)
        full = validate_options(method, dict(opts))
        qs = {}

        def quantize(n, W, H):
            qs[n] = quantize_weight(W, H, method, name=n, **opts)
            return qs[n]
        record = []
        if ft is not None and a.finetune_epochs is not None:
            ft = dict(ft, epochs=a.finetune_epochs)
        hook = None if ft is None else make_layer_hook(dict(BLOCKS[method].DEFAULTS, **ft), record)
        tick = time.perf_counter()
        with fisher_context(model, windows, full) as info:           # Fisher on the whole model
            all_layers = model.layers
            model.layers = all_layers[:a.layers]                     # quantize the first L only
            try:
                quantize_layers(model, windows, quantize, layer_hook=hook)
            finally:
                model.layers = all_layers
        secs = time.perf_counter() - tick
        nw = sum(q.shape[0] * q.shape[1] for q in qs.values())
        bpw = sum(q.bits_per_weight * q.shape[0] * q.shape[1] for q in qs.values()) / nw
        ppl, n, _ = perplexity(model, eval_ids, 512)
        print(json.dumps({"variant": name, "ppl": ppl, "eval_tokens": n, "seconds": round(secs, 1),
                          "bits_per_weight": bpw, **info,
                          "finetune": [{k: r[k] for k in ("layer", "mse_history", "mse_float32",
                                                          "epochs", "seconds")} for r in record],
                          "load": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()
