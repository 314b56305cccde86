"""llama.cpp's side of the interop benchmark (BENCHMARKS.md, "Interop").

Run with a Python that has `llama-cpp-python` (it builds llama.cpp from
source; not a refq dependency, not run in CI):

    python -m venv /tmp/llamacpp-venv && /tmp/llamacpp-venv/bin/pip install numpy llama-cpp-python
    /tmp/llamacpp-venv/bin/python benchmarks/bench_llamacpp.py ppl MODEL.gguf [...] --text data/eval.txt
    /tmp/llamacpp-venv/bin/python benchmarks/bench_llamacpp.py quantize IN.gguf OUT.gguf --type q4_0

`ppl` computes llama-perplexity's number with llama.cpp's own tokenizer and
forward pass, through the Python binding (the package ships no
llama-perplexity binary): the text tokenized with add_special (BOS when the
vocabulary asks), len // ctx chunks (the remainder dropped), each chunk's
first token replaced by BOS when the vocabulary adds one, the logits of all
positions kept (logits_all), and only positions ctx/2 .. ctx-2 scored, each
-log softmax in double precision; ppl = exp(mean). That is
tools/perplexity/perplexity.cpp, perplexity() (the same loop, in Python).

`quantize` calls llama_model_quantize (what the llama-quantize tool calls),
keeping the token embedding in F32 so that only the linears differ from a
refq export (whose embedding is F32).

Prints one JSON object per model on stdout.
"""
import argparse
import json
import sys
import time

import numpy as np


def llamacpp_ppl(path, text, ctx, threads):
    from llama_cpp import Llama
    llm = Llama(model_path=path, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)   # add_special
    plain = llm.tokenize(b"a", add_bos=False, special=False)
    adds_bos = len(llm.tokenize(b"a", add_bos=True, special=False)) > len(plain)
    bos = llm.token_bos()
    n_chunk = len(ids) // ctx
    first = ctx // 2
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    for i in range(n_chunk):
        chunk = list(ids[i * ctx:(i + 1) * ctx])
        if adds_bos:
            chunk[0] = bos
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[:ctx], dtype=np.float32)          # (ctx, V)
        for t in range(first, ctx - 1):
            row = logits[t]
            m = row.max()
            lse = np.log(np.exp((row - m).astype(np.float32)).astype(np.float64).sum())
            nll -= float(row[chunk[t + 1]] - m) - lse
            count += 1
    secs = time.perf_counter() - t0
    return {"model": path, "ppl": float(np.exp(nll / count)), "tokens": count,
            "text_tokens": len(ids), "chunks": n_chunk, "ctx": ctx, "adds_bos": adds_bos,
            "ids_head": [int(x) for x in ids[:8]], "seconds": round(secs, 2)}


def quantize(src, dst, kind, threads):
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
                    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[kind]
    params.nthread = threads
    params.token_embedding_type = llama_cpp.GGML_TYPE_F32
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        sys.exit(f"llama_model_quantize failed ({rc})")
    return {"quantized": dst, "from": src, "type": kind,
            "seconds": round(time.perf_counter() - t0, 2)}


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("ppl")
    a.add_argument("models", nargs="+")
    a.add_argument("--text", default="data/eval.txt")
    a.add_argument("--ctx", type=int, default=512)
    a.add_argument("--threads", type=int, default=2)
    q = sub.add_parser("quantize")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("--type", default="q4_0", choices=("q4_0", "q8_0"))
    q.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.cmd == "ppl":
        text = open(args.text, encoding="utf-8").read()
        for m in args.models:
            print(json.dumps(llamacpp_ppl(m, text, args.ctx, args.threads)), flush=True)
    else:
        print(json.dumps(quantize(args.src, args.dst, args.type, args.threads)))


if __name__ == "__main__":
    main()
