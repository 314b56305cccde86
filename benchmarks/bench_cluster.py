"""`--cluster local:N` against the single process, on SmolLM2 cut to its first decoder layers.

    python benchmarks/bench_cluster.py truncate --layers 2 --out /tmp/smol2L
    python benchmarks/bench_cluster.py quantize --model /tmp/smol2L --method aqlm \\
        [--options JSON] [--nsamples 32] [--cluster local:2] [--json]

`truncate` writes a copy of the default model with only its first --layers
decoder layers (config.json num_hidden_layers, the tensors of those layers,
embeddings, final norm and tokenizer): the same linears and shapes as the
whole model, for a run that fits a short benchmark.

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
    a = ap.parse_args()
    a.func(a)


if __name__ == "__main__":
    main()
