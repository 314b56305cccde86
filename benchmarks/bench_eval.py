"""Perplexity speed on SmolLM2 (issue #19): `llama_np.perplexity` on the first
TOKENS tokens of data/eval.txt, ctx 512, dense model.

    python benchmarks/bench_eval.py [--tokens 2048]

Runs the refq/llama_np of the folder it is started from (PYTHONPATH / cwd).
Prints one JSON line: seconds, tokens/s, ppl.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.getcwd())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    a = ap.parse_args()
    from llama_np import Tokenizer, load_model, perplexity
    from refq.fetch import resolve_model
    folder = resolve_model(None)
    model, tok = load_model(folder), Tokenizer(folder)
    with open("data/eval.txt", encoding="utf-8") as f:
        ids = tok.encode(f.read())[:a.tokens]
    t = time.perf_counter()
    ppl, n, _ = perplexity(model, ids, 512)
    s = time.perf_counter() - t
    print(json.dumps({"tokens": len(ids), "seconds": round(s, 2), "tok_per_s": round(len(ids) / s, 1),
                      "ppl": ppl, "load": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
