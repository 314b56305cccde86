"""Per-layer CPU times of two refq checkouts side by side, in ONE process (issue 21).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 \
        python benchmarks/bench_skeleton.py --old /tmp/refq-old [--reps 7] \
        [--methods gptq,claq,spqr,sparsegpt]

--old is the root of the old checkout (holding refq/); its refq package is copied
to a temporary folder as `refq_old` (imports rewritten), so that the old and
the new code (this checkout) run in the same process, alternating call by call
(the order flips every repetition): both see the same machine load, caches and
BLAS.  Each call is timed by time.process_time() (CPU time of the process, less
sensitive to a loaded machine than the wall time; run with one BLAS / numba
thread so that it is one core's time).  The tensors of both must be identical.
Layers: SmolLM2 layer-0 q_proj (576x576), up_proj (1536x576), down_proj
(576x1536) weights; H from 2048 seeded correlated activations with log-normal
channel scales (the loop's cost depends on the shapes, not on H's values).
Prints a markdown table: minimum and median over the repetitions, and new/old.
"""
import argparse
import os
import platform
import re
import shutil
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = {"gptq": {"act_order": True, "group_size": 128, "bits": 4},
           "claq": {"bits": 3},
           "spqr": {},
           "sparsegpt": {"sparsity": "2:4"}}
LINEARS = [("q_proj", "self_attn.q_proj"), ("up_proj", "mlp.up_proj"), ("down_proj", "mlp.down_proj")]


def import_old(root, tmp):
    """refq of the checkout at root, as the package refq_old."""
    dst = os.path.join(tmp, "refq_old")
    shutil.copytree(os.path.join(root, "refq"), dst)
    for folder, _, files in os.walk(dst):
        for f in files:
            if f.endswith(".py"):
                p = os.path.join(folder, f)
                with open(p, encoding="utf-8") as fh:
                    s = fh.read()
                s = re.sub(r"\b(from|import) refq\b", r"\1 refq_old", s)
                with open(p, "w", encoding="utf-8") as fh:
                    fh.write(s)
    sys.path.insert(0, tmp)
    import refq_old.api
    return refq_old.api


def layers(model):
    from safetensors.numpy import load_file
    t = load_file(model)
    res = {}
    for short, key in LINEARS:
        W = t[f"model.layers.0.{key}.weight"].astype(np.float32)
        n = W.shape[1]
        rng = np.random.default_rng(n)
        X = rng.standard_normal((2048, n)) @ (np.eye(n) + 0.5 * rng.standard_normal((n, n)) / np.sqrt(n))
        X *= np.exp(rng.standard_normal(n) * 0.5)
        res[short] = (W, X.T @ X / X.shape[0])
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True, help="root of the old checkout (holds refq/)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--methods", default=",".join(OPTIONS))
    ap.add_argument("--model", default=os.path.expanduser(
        "~/.cache/refq/models/SmolLM2-135M-Instruct/model.safetensors"))
    a = ap.parse_args()
    sys.path.insert(0, REPO)
    import refq.api as new
    with tempfile.TemporaryDirectory() as tmp:
        old = import_old(os.path.abspath(a.old), tmp)
        data = layers(a.model)
        rows, ratios = [], []
        for m in a.methods.split(","):
            o = OPTIONS[m]
            W, H = data["q_proj"]
            for api in (old, new):                               # numba compile / cache load
                api.quantize_weight(W[:32, :256], H[:256, :256], m, **o)
            for name, (W, H) in data.items():
                t = {"old": [], "new": []}
                out = {}
                for i in range(a.reps):
                    order = (("old", old), ("new", new)) if i % 2 == 0 else (("new", new), ("old", old))
                    for label, api in order:
                        tick = time.process_time()
                        q = api.quantize_weight(W, H, m, **o)
                        t[label].append(time.process_time() - tick)
                        out[label] = q.tensors()
                same = all(np.array_equal(out["old"][k], out["new"][k]) for k in out["old"])
                r = min(t["new"]) / min(t["old"])
                ratios.append(r)
                rows.append(f"| {m} | {name} | {min(t['old']):.4f} | {min(t['new']):.4f} | {r:.3f} "
                            f"| {np.median(t['new']) / np.median(t['old']):.3f} "
                            f"| {'identical' if same else 'DIFFER'} |")
                print(rows[-1], file=sys.stderr, flush=True)
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{platform.processor() or platform.machine()}, nproc {os.cpu_count()}, load average {load}, "
          f"{a.reps} repetitions, OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '-')}, "
          f"NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS', '-')}\n")
    print("| method | layer | old CPU s (min) | new CPU s (min) | new/old (min) | new/old (median) | outputs |")
    print("|---|---|---:|---:|---:|---:|---|")
    print("\n".join(rows))
    print(f"\ngeometric mean new/old (min): {np.exp(np.mean(np.log(ratios))):.3f}")


if __name__ == "__main__":
    main()
