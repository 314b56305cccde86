"""`--cluster local:N` against the single process, on SmolLM2 cut to its first decoder layers.

    python benchmarks/bench_cluster.py truncate --layers 2 --out /tmp/smol2L
    python benchmarks/bench_cluster.py quantize --model /tmp/smol2L --method aqlm \\
        [--options JSON] [--nsamples 32] [--cluster local:2] [--json]

`truncate` writes a copy of the default model with only its first --layers
decoder layers (config.json num_hidden_layers, the tensors of those layers,
embeddings, final norm and tokenizer): the same linears and shapes as the
whole model, for a run that fits a short benchmark.

`estimate` turns the per-linear times of such runs into the wall time and the
network traffic of a 7B / 70B LLaMA on N machines (BENCHMARKS.md explains the
model; it is arithmetic on measured numbers, not a measurement).

`quantize` runs refq.quantize_model (what `refq quantize` runs) once, without
or with a cluster, and prints one JSON line: wall seconds, the peak RSS of
this process and (with a cluster) of each worker process, the sha256 of the
saved checkpoint's files (same bytes with and without the cluster), and with a
cluster, from Dask's task stream, each linear's compute seconds on its worker
and the bytes that travelled to the workers (the scattered W and H) and back
(the packed fields).
"""
import argparse
import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def truncate(a):
    from safetensors.numpy import load_file, save_file
    from refq.fetch import default_model_path
    src = a.model or default_model_path()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = a.layers
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    t = load_file(os.path.join(src, "model.safetensors"))
    keep = {k: v for k, v in t.items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < a.layers}
    save_file(keep, os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
    for f in os.listdir(src):
        if f.startswith("tokenizer") or f == "generation_config.json":
            shutil.copy(os.path.join(src, f), a.out)
    print(f"{a.out}: {a.layers} decoder layers, {len(keep)} tensors")


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_plugin():
    """A worker plugin recording each task's CPU seconds (process_time of its one-thread
    worker process from "executing" to the next state): on a loaded machine the task
    stream's wall seconds include the time other processes held the cores."""
    import distributed

    class CpuTimes(distributed.WorkerPlugin):
        def setup(self, worker):
            self.worker, self.t0 = worker, {}
            worker.cpu_seconds = {}

        def transition(self, key, start, finish, **kw):
            if finish == "executing":
                self.t0[key] = time.process_time()
            elif start == "executing" and key in self.t0:
                self.worker.cpu_seconds[str(key)] = time.process_time() - self.t0.pop(key)
    return CpuTimes()


def _cpu_seconds(dask_worker):
    return dask_worker.cpu_seconds


def quantize(a):
    from llama_np import Tokenizer, load_model
    from refq.calibrate import calibration_windows
    from refq.pipeline import quantize_model
    from benchmarks.harness import machine

    model, tok = load_model(a.model), Tokenizer(a.model)
    with open(os.path.join(REPO, "data", "calib.txt"), encoding="utf-8") as f:
        windows = calibration_windows(tok.encode(f.read()), a.nsamples, a.seqlen, 0)
    options = json.loads(a.options)
    res = {"machine": machine(), "method": a.method, "options": options,
           "nsamples": a.nsamples, "seqlen": a.seqlen, "cluster": a.cluster,
           "layers": len(model.layers)}
    client = cluster = None
    if a.cluster:
        import logging

        import distributed
        n = int(a.cluster.split(":")[1])
        cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                           dashboard_address=None, silence_logs=logging.ERROR,
                                           env={"NUMBA_NUM_THREADS": "1"})
        client = distributed.Client(cluster)
        client.register_plugin(_cpu_plugin(), name="cpu-times")
    t0 = time.perf_counter()
    if client is not None:
        from distributed import get_task_stream
        with get_task_stream(client) as ts:
            run = quantize_model(model, a.method, options, windows, cluster=client)
        tasks = [t for t in ts.data if str(t["key"]).startswith("refq-quantize-")]
        res["linear_seconds"] = {}
        for t in tasks:       # the last try of each linear (a lost task runs again)
            name = str(t["key"])[len("refq-quantize-"):].rsplit("-", 1)[0]
            res["linear_seconds"][name] = round(sum(s["stop"] - s["start"] for s in t["startstops"]
                                                    if s["action"] == "compute"), 3)
        cpu = {k: v for w in client.run(_cpu_seconds).values() for k, v in w.items()}
        res["linear_cpu_seconds"] = {k[len("refq-quantize-"):].rsplit("-", 1)[0]: round(v, 3)
                                     for k, v in cpu.items() if k.startswith("refq-quantize-")}
    else:
        run = quantize_model(model, a.method, options, windows)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    # what travels per layer: each W float32 and each group's H float64 once, to the
    # workers; the packed tensors back
    from llama_np import LINEAR_GROUPS
    sent = back = 0
    for i, layer in enumerate(model.layers):
        for group in LINEAR_GROUPS:
            sent += layer.linears[group[0]].shape[1] ** 2 * 8                  # H (in, in)
            for n in group:
                q = run.quantized[f"model.layers.{i}.{n}"]
                sent += q.shape[0] * q.shape[1] * 4                               # W (out, in)
                back += sum(t.nbytes for t in q.tensors().values())
    res["bytes_to_workers"], res["bytes_back"] = sent, back
    res["bits_per_weight"] = run.bits_per_weight
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "ckpt")
        run.save(out, a.model)
        res["sha256"] = {f: hashlib.sha256(open(os.path.join(out, f), "rb").read()).hexdigest()
                         for f in sorted(os.listdir(out))}
    res["peak_rss_mib"] = round(peak_rss_mib(), 1)
    if client is not None:
        res["worker_peak_rss_mib"] = sorted(round(v, 1) for v in client.run(peak_rss_mib).values())
        client.close()
        cluster.close()
    res["machine_after"] = machine()
    print(json.dumps(res))


# ---------------------------------------------------------------------------- estimate
SHAPES = {   # name: (hidden, intermediate, layers, kv heads x head dim), LLaMA-2 7B / 70B
    "7B": (4096, 11008, 32, 4096),
    "70B": (8192, 28672, 80, 1024),
}
GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def linear_shapes(d, ff, kv):
    """{linear: (out, in)} of one decoder layer."""
    return {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, d),
            "gate_proj": (ff, d), "up_proj": (ff, d), "down_proj": (d, ff)}


def work(method, out, inp, opts):
    """The operation count that the method's time is taken to scale with.
    GPTQ: the column-by-column update of W, 2 out in², and the Cholesky
    factor and inverse of H, ~in³.  AQLM: per round, for each of out x in/g
    groups and M codebooks, 2^B candidates scored with g² terms each, and the
    chosen code's change of r H, in·g: out in M (2^B g + in)."""
    if method == "gptq":
        return 2 * out * inp ** 2 + inp ** 3
    g, M, B = opts["in_group_size"], opts["num_codebooks"], opts["nbits_per_codebook"]
    return out * inp * M * (2 ** B * g + inp)


def calib_flop_per_token(d, ff, kv):
    """Useful FLOP per calibration token of one layer in the default mode: the capture
    pass (products up to down_proj's input) + the forward pass (all seven) + the four
    Gram matrices (syrk: in² per token each); attention is left out (<1% at 512 tokens)."""
    sh = linear_shapes(d, ff, kv)
    params = sum(o * i for o, i in sh.values())
    return 2 * (params - d * ff) + 2 * params + 3 * d * d + ff * ff


def makespan(times, slots):
    """Longest-first greedy schedule of independent tasks on `slots` workers."""
    load = [0.0] * slots
    for t in sorted(times, reverse=True):
        load[load.index(min(load))] += t
    return max(load)


def estimate(a):
    from refq.api import validate_options
    runs = [json.loads(open(p).readline()) for p in a.runs]
    small = linear_shapes(576, 1536, 192)                   # SmolLM2-135M
    print(f"calibration {a.gflops} GFLOP/s on the client, {a.tokens} tokens; "
          f"network {a.gbit} Gbit/s at the client; {a.slots} one-thread workers per machine")
    for r in runs:
        method = r["method"]
        opts = validate_options(method, r["options"])
        # rate: measured seconds / work, over the linears of the last layer (no JIT warm-up)
        last = r["layers"] - 1
        meas = {n.split(".")[-1]: t for n, t in r[a.times].items()
                if n.startswith(f"model.layers.{last}.")}
        rate = sum(meas.values()) / sum(work(method, *small[n], opts) for n in meas)
        if method == "gptq" and a.gptq_gflops:        # GPTQ's work as FLOP at a BLAS rate
            rate = 1 / (a.gptq_gflops * 1e9)
        print(f"\n{method} {r['options']}: SmolLM2 layer {last}, seconds per linear (1 thread): "
              + ", ".join(f"{n} {meas[n]:.2f} (model {rate * work(method, *small[n], opts):.2f})"
                          for n in small))
        for name, (d, ff, L, kv) in SHAPES.items():
            sh = linear_shapes(d, ff, kv)
            t_lin = {n: rate * work(method, o, i, opts) for n, (o, i) in sh.items()}
            calib = calib_flop_per_token(d, ff, kv) * a.tokens / (a.gflops * 1e9)
            to_workers = sum(o * i * 4 for o, i in sh.values()) + sum(
                sh[g[0]][1] ** 2 * 8 for g in GROUPS)
            back = sum(o * i for o, i in sh.values()) * r["bits_per_weight"] / 8
            print(f"  {name}: per layer calibration {calib:.0f} s, linears "
                  + ", ".join(f"{n} {t:.0f} s" for n, t in t_lin.items())
                  + f"; to the workers {to_workers / 2**30:.2f} GiB, back {back / 2**20:.0f} MiB")
            one = L * (calib + sum(t_lin.values()))
            print(f"    no cluster, linears one after another on 1 thread: model {one / 3600:.1f} h; "
                  f"no gain beyond N = {-(-len(sh) // a.slots)} machines (7 linears per layer)")
            for N in a.machines:
                net = 0 if N == 1 else (to_workers + back) / (a.gbit * 1e9 / 8)
                quant = makespan(list(t_lin.values()), a.slots * N)
                seq = sum(makespan([t_lin[n] for n in g], a.slots * N) for g in GROUPS)
                total = L * (calib + net + quant)
                print(f"    N={N:>3}: layer = calib {calib:.0f} + network {net:.1f} + linears "
                      f"{quant:.0f} s (true-sequential: {seq:.0f} s) -> model {total / 3600:.1f} h; "
                      f"traffic {L * (to_workers + back) / 2**30 if N > 1 else 0:.0f} GiB")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("truncate")
    s.add_argument("--model", default=None)
    s.add_argument("--layers", type=int, default=2)
    s.add_argument("--out", required=True)
    s.set_defaults(func=truncate)
    s = sub.add_parser("quantize")
    s.add_argument("--model", required=True)
    s.add_argument("--method", default="aqlm")
    s.add_argument("--options", default="{}")
    s.add_argument("--nsamples", type=int, default=32)
    s.add_argument("--seqlen", type=int, default=512)
    s.add_argument("--cluster", default=None, help="local:N")
    s.set_defaults(func=quantize)
    s = sub.add_parser("estimate")
    s.add_argument("runs", nargs="+", help="JSON lines of `quantize --cluster` runs")
    s.add_argument("--gflops", type=float, default=138.0,
                   help="calibration rate on one machine (BENCHMARKS.md, quiet 2 cores: 131-141)")
    s.add_argument("--tokens", type=int, default=128 * 512)
    s.add_argument("--gbit", type=float, default=10.0, help="client network, Gbit/s")
    s.add_argument("--slots", type=int, default=2, help="one-thread workers per machine")
    s.add_argument("--machines", type=int, nargs="+", default=[1, 8, 64])
    s.add_argument("--gptq-gflops", type=float, default=None, help="GPTQ at this FLOP rate "
                   "(e.g. one thread's dgemm rate) instead of the rate fitted on SmolLM2's shapes")
    s.add_argument("--times", default="linear_cpu_seconds", choices=("linear_cpu_seconds",
                   "linear_seconds"), help="per-linear CPU seconds (default) or wall seconds")
    s.set_defaults(func=estimate)
    a = ap.parse_args()
    a.func(a)


if __name__ == "__main__":
    main()
