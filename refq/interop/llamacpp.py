"""Run llama.cpp's own tools (llama-perplexity, llama-quantize) on refq's GGUF exports.

Not a refq dependency: used by benchmarks/bench_llamacpp.py and by the optional
tests (tests/test_llamacpp.py), which skip when the binaries are absent. The
binaries are looked up in `LLAMA_CPP_DIR` (a folder holding llama-perplexity
and llama-quantize, e.g. a llama.cpp build's build/bin), then on PATH.

    perplexity(bins, "model.gguf", "data/eval.txt", ctx=512)
        -> {"ppl": 35.30, "ppl_err": 1.24, "chunks": 32, "ctx": 512, ...}
    quantize(bins, "f32.gguf", "q4_0.gguf", "q4_0")

llama-perplexity's protocol (tools/perplexity/perplexity.cpp, perplexity()):
the text tokenized with the vocabulary's BOS, len // ctx chunks of ctx tokens
(the rest dropped), each chunk's first token replaced by BOS when the vocabulary
adds one, only positions ctx/2 .. ctx-2 of a chunk scored; ppl = exp(mean NLL).
`refq eval --protocol llama.cpp` implements the same (refq/interop/evaluate.py).
"""
import os
import re
import shutil
import subprocess

from refq.errors import RefqError

TOOLS = ("llama-perplexity", "llama-quantize")
ENV = "LLAMA_CPP_DIR"


def find_binaries(folder=None):
    """{tool: path} for llama-perplexity and llama-quantize, or None if either is
    missing. folder: where to look first (default: $LLAMA_CPP_DIR), then PATH."""
    folder = folder or os.environ.get(ENV)
    found = {}
    for tool in TOOLS:
        path = os.path.join(folder, tool) if folder else None
        if not (path and os.path.isfile(path) and os.access(path, os.X_OK)):
            path = shutil.which(tool)
        if not path:
            return None
        found[tool] = path
    return found


# llama.cpp's tools log from a worker thread that is never joined (common/log.cpp: "this
# design may cause logs to be lost if not flushed before the program exits"): under load
# the last lines, 'Final estimate: PPL = ...' among them, are often lost. A library
# preloaded into the tool whose ELF destructor waits 0.3 s at exit gives that thread the
# time to write them (20 of 20 runs complete with it, 18 of 20 without, on a tiny model).
LOG_WAIT_C = ("#include <unistd.h>\n"
              "__attribute__((destructor)) static void refq_wait_for_log(void) { usleep(300000); }\n")


def _log_wait_library():
    """Path of the preload library above, compiled once with the C compiler (cc); None
    without one (perplexity() then falls back on repeating the run)."""
    import tempfile
    path = os.path.join(tempfile.gettempdir(), f"refq-llamacpp-logwait-{os.getuid()}.so")
    if os.path.isfile(path):
        return path
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None
    with tempfile.TemporaryDirectory() as d:
        src, out = os.path.join(d, "w.c"), os.path.join(d, "w.so")
        with open(src, "w") as f:
            f.write(LOG_WAIT_C)
        if subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", out, src],
                          capture_output=True).returncode != 0:
            return None
        shutil.copyfile(out, path + f".{os.getpid()}")
        os.replace(path + f".{os.getpid()}", path)
    return path


def _run(args, timeout):
    env = dict(os.environ)
    lib = _log_wait_library()
    if lib:
        env["LD_PRELOAD"] = " ".join(filter(None, [lib, env.get("LD_PRELOAD")]))
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise RefqError(f"{os.path.basename(args[0])}: no answer within {timeout} s") from None
    if p.returncode != 0:
        tail = " | ".join(p.stderr.strip().splitlines()[-3:])
        raise RefqError(f"{os.path.basename(args[0])} exited with {p.returncode}: {tail}")
    return p.stdout + p.stderr


def version(bins):
    """llama.cpp's own account of the build: `llama-perplexity --version`, one line
    ('version: 0.2.0-dev (build 0, commit unknown); built with GNU 12.2.0 for ...')."""
    out = _run([bins["llama-perplexity"], "--version"], 60)
    return "; ".join(line.strip() for line in out.splitlines() if line.strip())


def perplexity(bins, model, text, ctx=512, threads=1, repack=False, timeout=3600, tries=3):
    """llama-perplexity -m MODEL -f TEXT -c CTX -b CTX -t THREADS --no-repack -> its numbers.

    -b CTX: one chunk per batch (the same result as any batch size; less memory).
    --no-repack (unless repack): ggml's plain CPU kernels, without the "extra"
    buffer types (weights repacked for AVX2/AVX-512 or AMX tiles). On a CPU that
    reports AMX, llama.cpp's default puts Q4_0 weights in its AMX buffer, and in the
    VM where this was measured that path died with SIGSEGV in ggml_backend_amx_mul_mat.

    llama.cpp's log can lose its last lines at exit (LOG_WAIT_C above). The 'Final
    estimate: PPL = P +/- E' line is used when present; else the running value
    printed after the last chunk ('[n]P', the same exp(mean NLL) to the same 4
    decimals, without E); else the run is repeated (up to `tries`)."""
    args = [bins["llama-perplexity"], "-m", model, "-f", text, "-c", str(ctx), "-b", str(ctx),
            "-t", str(threads), "--no-warmup"] + ([] if repack else ["--no-repack"])
    for attempt in range(1, tries + 1):
        log = _run(args, timeout)
        chunks = re.search(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)", log)
        n = int(chunks.group(1)) if chunks else None
        final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
        running = dict(re.findall(r"\[(\d+)\]([0-9.]+),", log))
        if final:
            ppl, err, source = float(final.group(1)), float(final.group(2)), "final estimate"
        elif n and str(n) in running:
            ppl, err, source = float(running[str(n)]), None, f"running value after chunk {n}"
        else:
            continue
        return {"ppl": ppl, "ppl_err": err, "ppl_from": source, "attempts": attempt,
                "chunks": n, "scored_tokens": n * (ctx - ctx // 2 - 1) if n else None,
                "ctx": ctx, "threads": threads, "repack": repack, "model": model}
    raise RefqError(f"llama-perplexity on {model}: no perplexity in its output ({tries} runs)")


def quantize(bins, src, dst, kind="q4_0", threads=1, timeout=3600):
    """llama-quantize --pure SRC DST KIND, the token embedding (= the tied output) kept
    in F32 as in refq's GGUF export, so that only the linears differ. --pure: every
    other 2-D tensor gets KIND (no k-quant mixture rules). -> {"seconds", ...}."""
    import time
    t0 = time.perf_counter()
    log = _run([bins["llama-quantize"], "--pure", "--token-embedding-type", "f32",
                "--output-tensor-type", "f32", src, dst, kind, str(threads)], timeout)
    return {"from": src, "to": dst, "type": kind, "seconds": round(time.perf_counter() - t0, 2),
            "log_tail": log.strip().splitlines()[-3:]}
