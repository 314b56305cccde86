"""The official GPTQ pipeline (IST-DASLab/gptq, torch, CPU) and refq's, side by side.

This is a benchmark, not a test (issue 19).  It times the whole layer-sequential
quantization -- calibration forwards, Hessians, GPTQ -- of the README's main
configuration (GPTQ w3 g128 act-order, asymmetric, percdamp 0.01, not
true-sequential, 128 x 512 calibration tokens of data/calib.txt, seed 0) in
both codes, in separate processes, alternately, so that both see the same
machine load.  The official code is NOT part of refq: fetch it yourself
(`git clone https://github.com/IST-DASLab/gptq /tmp/gptq`) and make a Python
with torch and transformers (`python -m venv /tmp/tv && /tmp/tv/bin/pip install
torch transformers numpy safetensors`):

    python benchmarks/bench_gptq_official_pipeline.py --official-dir /tmp/gptq \
        --torch-python /tmp/tv/bin/python [--layers 4] [--rounds 2] [--threads 2] \
        [--cache /tmp/refq-gptq-pipeline] [--model FOLDER]

Steps (main mode, refq's Python):
 1. The calibration windows, refq.calibrate.calibration_windows(tokenizer(data/calib.txt),
    128, 512, seed 0), are written to CACHE/windows.npy: both codes get the same tokens.
 2. --rounds times, alternately, each under /usr/bin/time -v (peak RSS):
    * official: `TORCH_PYTHON this_script --run-official` loads the model with
      transformers' LlamaForCausalLM in float32 (attention: sdpa, causal), keeps
      only the first --layers decoder layers in model.model.layers (the others
      stay referenced, so the weights held are the whole model's), and calls the
      official llama.py's `llama_sequential(model, windows, cpu)` with its global
      `args` = wbits 3, groupsize 128, act_order True, true_sequential False,
      static_groups False, sym False, percdamp 0.01, nsamples 128, and
      torch.set_num_threads(--threads).  Adapted, not changed: torch.cuda.synchronize
      / empty_cache are no-ops (CPU-only torch); transformers 5's decoder layers need
      `position_embeddings`, which the official Catcher does not pass on, so
      LlamaDecoderLayer.forward computes them from the model's rotary_emb when
      missing; the per-layer times come from a wrapper around the `find_layers`
      that llama_sequential calls once at the start of each layer.
    * refq: `python this_script --run-refq` loads the model with llama_np, keeps the
      first --layers decoder layers the same way, and calls
      refq.pipeline.quantize_model(model, "gptq", {bits 3, group_size 128,
      act_order True}, windows, threads=--threads) -- what `refq quantize` calls --
      with per-layer times from its on_layer callback.
    (`TORCH_PYTHON this_script --check-layer` checks that adaptation: the layer called
    as the official loop calls it gives transformers' own layer output, bit for bit.)
    Each prints one JSON line: the seconds of the sequential quantization, of each
    layer, and of the model load.
 3. Prints a markdown table: per-layer time (median over layers 1.. of each run:
    layer 0 of refq's first run includes numba's compilation), the sequential time,
    peak RSS, and the ratios official / refq.
"""

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.abspath(os.path.dirname(__file__)))
MODEL = os.path.expanduser("~/.cache/refq/models/SmolLM2-135M-Instruct")
NSAMPLES, SEQLEN, SEED = 128, 512, 0
BITS, GROUP, ACT_ORDER, PERCDAMP = 3, 128, True, 0.01


# ---------------------------------------------------------------------------
# official side (under a Python with torch and transformers)
# ---------------------------------------------------------------------------
def fill_position_embeddings():
    """transformers 5's LlamaDecoderLayer needs position_embeddings (cos, sin), which the
    official Catcher does not keep: compute them, when missing, with the model's
    rotary_emb (put in the returned dict as "emb"), once (every window has positions 0..T-1)."""
    from transformers.models.llama import modeling_llama
    rotary = {}
    forward = modeling_llama.LlamaDecoderLayer.forward

    def layer_forward(self, hidden_states, *args, position_embeddings=None, **kw):
        if position_embeddings is None:
            if "cs" not in rotary:
                rotary["cs"] = rotary["emb"](hidden_states, position_ids=kw["position_ids"])
            position_embeddings = rotary["cs"]
        return forward(self, hidden_states, *args, position_embeddings=position_embeddings, **kw)
    modeling_llama.LlamaDecoderLayer.forward = layer_forward
    return rotary


def check_layer(a):
    """The official loop's call of a decoder layer -- layer(x, attention_mask=, position_ids=)
    with what its Catcher keeps from the model's call, position_embeddings filled in as above --
    against transformers' own output of that layer in a whole-model forward (one window)."""
    import torch
    torch.set_num_threads(a.threads)
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    ids = torch.from_numpy(np.load(os.path.join(a.cache, "windows.npy"))[:1])
    kept = {}
    hook = model.model.layers[0].register_forward_pre_hook(
        lambda mod, args, kw: kept.update(kw), with_kwargs=True)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    hook.remove()
    rotary = fill_position_embeddings()
    rotary["emb"] = model.model.rotary_emb
    with torch.no_grad():
        out = model.model.layers[0](hs[0], attention_mask=kept["attention_mask"],
                                    position_ids=kept["position_ids"])[0]
    print(json.dumps({"attention_mask": repr(type(kept["attention_mask"])),
                      "max_abs_diff": (out - hs[1][0]).abs().max().item(),
                      "max_abs": hs[1].abs().max().item()}))


def run_official(a):
    import torch
    torch.set_num_threads(a.threads)
    torch.cuda.synchronize = lambda *args, **kw: None         # CPU-only torch refuses these
    torch.cuda.empty_cache = lambda *args, **kw: None
    from transformers import LlamaForCausalLM

    sys.path.insert(0, os.path.abspath(a.official_dir))
    with contextlib.redirect_stdout(io.StringIO()):           # quant.py: "CUDA extension not installed."
        import llama as off_llama

    rotary = fill_position_embeddings()

    starts = []                                                # find_layers: once per layer
    find_layers = off_llama.find_layers

    def timed_find_layers(*args, **kw):
        starts.append(time.perf_counter())
        return find_layers(*args, **kw)
    off_llama.find_layers = timed_find_layers

    windows = torch.from_numpy(np.load(os.path.join(a.cache, "windows.npy")))
    t0 = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    t_load = time.perf_counter() - t0
    rotary["emb"] = model.model.rotary_emb
    all_layers = list(model.model.layers)                      # keep every layer's weights held
    model.model.layers = torch.nn.ModuleList(all_layers[:a.layers])
    model.config.num_hidden_layers = a.layers
    model.seqlen = windows.shape[1]
    off_llama.args = argparse.Namespace(
        wbits=BITS, groupsize=GROUP, act_order=ACT_ORDER, true_sequential=False,
        static_groups=False, sym=False, percdamp=PERCDAMP, nsamples=windows.shape[0])
    loader = [(windows[i:i + 1],) for i in range(windows.shape[0])]
    with contextlib.redirect_stdout(io.StringIO()):            # it prints each linear's error
        t0 = time.perf_counter()
        off_llama.llama_sequential(model, loader, torch.device("cpu"))
        t_end = time.perf_counter()
    starts.append(t_end)
    if a.save_model:                   # the quantized weights (dequantized in place), as a dense model
        model.model.layers = torch.nn.ModuleList(all_layers)
        model.config.num_hidden_layers = len(all_layers)
        model.save_pretrained(a.save_model)
        for name in os.listdir(a.model):                       # the tokenizer's files
            if name.startswith("tokenizer") or name == "special_tokens_map.json":
                shutil.copy(os.path.join(a.model, name), a.save_model)
    print(json.dumps({"code": "official", "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "load_s": t_load,
                      "sequential_s": t_end - t0, "capture_s": starts[0] - t0,
                      "layer_s": [b - s for s, b in zip(starts, starts[1:])]}), flush=True)


# ---------------------------------------------------------------------------
# refq side
# ---------------------------------------------------------------------------
def run_refq(a):
    sys.path.insert(0, REPO)
    from llama_np import load_model
    from refq.pipeline import quantize_model

    windows = np.load(os.path.join(a.cache, "windows.npy"))
    t0 = time.perf_counter()
    model = load_model(a.model)
    t_load = time.perf_counter() - t0
    all_layers = list(model.layers)                           # keep every layer's weights held
    model.layers = all_layers[:a.layers]
    times = []
    t0 = time.perf_counter()
    quantize_model(model, "gptq", {"bits": BITS, "group_size": GROUP, "act_order": ACT_ORDER,
                                   "percdamp": PERCDAMP},
                   windows, threads=a.threads, on_layer=lambda i, s: times.append(s))
    t = time.perf_counter() - t0
    print(json.dumps({"code": "refq", "threads": a.threads, "load_s": t_load, "sequential_s": t,
                      "layer_s": times}), flush=True)


# ---------------------------------------------------------------------------
# main: windows, then the two alternately
# ---------------------------------------------------------------------------
def timed_run(cmd):
    """Run cmd under /usr/bin/time -v; -> (its JSON line, peak RSS in MB, wall seconds)."""
    p = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time .*: (.+)", p.stderr).group(1)
    secs = sum(float(x) * 60 ** k for k, x in enumerate(reversed(wall.split(":"))))
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line), rss / 1024, secs


def main_mode(a):
    sys.path.insert(0, REPO)
    from llama_np import Tokenizer
    from refq.calibrate import calibration_windows
    from refq.cli_common import DEFAULT_CALIB
    from refq.machine import cpu_model

    os.makedirs(a.cache, exist_ok=True)
    with open(DEFAULT_CALIB, encoding="utf-8") as f:
        ids = Tokenizer(a.model).encode(f.read())
    np.save(os.path.join(a.cache, "windows.npy"), calibration_windows(ids, NSAMPLES, SEQLEN, SEED))

    common = ["--cache", a.cache, "--model", a.model, "--layers", str(a.layers),
              "--threads", str(a.threads)]
    runs = []
    for r in range(a.rounds):
        for code, cmd in (("official", [a.torch_python, __file__, "--run-official",
                                        "--official-dir", a.official_dir] + common),
                          ("refq", [sys.executable, __file__, "--run-refq"] + common)):
            load = os.getloadavg()[0]
            res, rss, wall = timed_run(cmd)
            res.update(round=r, rss_mb=rss, wall_s=wall, load_before=load)
            runs.append(res)
            print(json.dumps(res), file=sys.stderr, flush=True)

    print(f"\n{cpu_model()}, nproc {os.cpu_count()}, {a.threads} threads, first {a.layers} "
          f"decoder layers of {os.path.basename(a.model)}, {NSAMPLES} x {SEQLEN} tokens\n")
    print("| round | code | load avg before | per layer (median of layers 1..) | layers | "
          "sequential total | peak RSS | process wall |")
    print("|---|---|---:|---:|---|---:|---:|---:|")
    med = {}
    for res in runs:
        m = statistics.median(res["layer_s"][1:] or res["layer_s"])
        med.setdefault(res["code"], []).append(m)
        print(f"| {res['round']} | {res['code']} | {res['load_before']:.1f} | {m:.2f} s | "
              f"{', '.join(f'{s:.1f}' for s in res['layer_s'])} | {res['sequential_s']:.1f} s | "
              f"{res['rss_mb']:.0f} MB | {res['wall_s']:.1f} s |")
    for r in range(a.rounds):
        o, q = runs[2 * r], runs[2 * r + 1]
        print(f"\nround {r}: official / refq per layer {med['official'][r] / med['refq'][r]:.2f}x, "
              f"sequential {o['sequential_s'] / q['sequential_s']:.2f}x, "
              f"peak RSS {o['rss_mb'] / q['rss_mb']:.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official-dir", default="/tmp/gptq")
    ap.add_argument("--torch-python", default="python")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--cache", default="/tmp/refq-gptq-pipeline")
    ap.add_argument("--layers", type=int, default=4, help="first N decoder layers (both codes)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-model", default=None, metavar="DIR",
                    help="with --run-official: save the quantized model (dense float32, HF "
                         "layout) to DIR, for `refq eval`")
    ap.add_argument("--run-official", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run-refq", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--check-layer", action="store_true",
                    help="(under --torch-python) check the official loop's layer call against "
                         "transformers' whole-model forward")
    a = ap.parse_args()
    if a.run_official:
        run_official(a)
    elif a.check_layer:
        check_layer(a)
    elif a.run_refq:
        run_refq(a)
    else:
        main_mode(a)


if __name__ == "__main__":
    main()
