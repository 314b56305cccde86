"""What the benchmarks/bench_*_official.py scripts share.

Each script compares refq with a method's official code on real SmolLM2
layers: the official code runs under a Python with torch (--torch-python), in
a worker process started by the script itself with --run-official; refq runs
in the script's own process.  This module holds the common parts:

- the layers: (W, H) of chosen linears, H = mean x xᵀ from a dense
  layer-by-layer pass over calibration text, cached in an npz file
  (build_cache, layers_npz; keys "W_<layer>_<linear>", "H_...");
- the official side: a worker answering one JSON line per request
  (OfficialWorker), or a single run that writes its results to an npz file
  (npz_main / official_npz, with the arguments of add_npz_arguments);
- the report: the machine line (machine) and the geometric mean (gmean).
"""

import json
import math
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_PYTHON = "/tmp/tfenv/bin/python"
LINEAR_FULL = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
               "v_proj": "self_attn.v_proj", "o_proj": "self_attn.o_proj",
               "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj"}


def key(name):
    """'0.self_attn.q_proj' -> '0_self_attn_q_proj' (npz keys)."""
    return name.replace(".", "_")


# ---------------------------------------------------------------------------
# the layers
# ---------------------------------------------------------------------------
def add_calibration_arguments(ap):
    """--model --calib --layers --linears --nsamples --seqlen --seed (build_cache reads them)."""
    ap.add_argument("--model", default=None, help="HF folder (default: the fetched SmolLM2-135M)")
    ap.add_argument("--calib", default=os.path.join(REPO, "data", "calib.txt"))
    ap.add_argument("--layers", default="0,10,20")
    ap.add_argument("--linears", default="q_proj,o_proj,up_proj,down_proj")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)


def full_names(a):
    """--layers 0,10 --linears q_proj,up_proj -> ['0.self_attn.q_proj', '0.mlp.up_proj', ...]."""
    return [f"{int(l)}.{LINEAR_FULL[n]}" for l in a.layers.split(",") for n in a.linears.split(",")]


def settings(a):
    """The calibration settings a cache was built with (stored in it, compared on reuse)."""
    return json.dumps({"layers": a.layers, "linears": a.linears, "nsamples": a.nsamples,
                       "seqlen": a.seqlen, "seed": a.seed, "calib": os.path.abspath(a.calib)})


def build_cache(a, names, path):
    """(W, H) of the linears `names` of the model, dense calibration -> npz at path."""
    sys.path.insert(0, REPO)
    from llama_np import Tokenizer, load_model
    from llama_np.model import LINEAR_GROUPS
    from refq.calibrate import calibration_windows, capture_hessians
    from refq.fetch import resolve_model

    folder = resolve_model(a.model)
    model, tok = load_model(folder), Tokenizer(folder)
    with open(a.calib, encoding="utf-8") as f:
        ids = tok.encode(f.read())
    windows = calibration_windows(ids, a.nsamples, a.seqlen, a.seed)
    pos = np.arange(a.seqlen)
    hs = [model.embed(w) for w in windows]
    wanted = {}                                            # layer -> [linear name]
    for n in names:
        i, lin = n.split(".", 1)
        wanted.setdefault(int(i), []).append(lin)
    arrays = {"names": np.array(json.dumps(names)), "settings": np.array(settings(a))}
    t0 = time.perf_counter()
    for i, layer in enumerate(model.layers[:max(wanted) + 1]):
        if i in wanted:
            groups = [g for g in LINEAR_GROUPS if any(l in g for l in wanted[i])]
            Hs = capture_hessians(layer, hs, pos, groups)      # dense: weights untouched
            for lin in wanted[i]:
                g = next(g for g in groups if lin in g)
                arrays[f"W_{i}_{key(lin)}"] = np.asarray(layer.linears[lin].dequantize(), np.float32)
                arrays[f"H_{i}_{key(lin)}"] = Hs[g]
        if i < max(wanted):
            hs = [layer.forward(h, pos) for h in hs]
        print(f"calibration: layer {i} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
              flush=True)
    np.savez(path, **arrays)


def layers_npz(a, names, path):
    """The cache at path, (re)built when missing or built with other settings -> np.load."""
    if not os.path.isfile(path) or str(np.load(path)["settings"]) != settings(a):
        build_cache(a, names, path)
    return np.load(path)


# ---------------------------------------------------------------------------
# the official side
# ---------------------------------------------------------------------------
class Worker:
    """A child process (argv) answering one JSON line per request line."""

    def __init__(self, argv):
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(self, msg):
        self.p.stdin.write(msg + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise SystemExit(f"worker died (exit {self.p.wait()})")
        return json.loads(line)

    def close(self):
        self.p.stdin.close()
        self.p.wait()


class OfficialWorker(Worker):
    """`TORCH_PYTHON script --run-official ARGS` answering one JSON line per request line."""

    def __init__(self, torch_python, script, args):
        super().__init__([torch_python, os.path.abspath(script), "--run-official", *args])


def add_npz_arguments(ap, layers, out_npz):
    """The arguments of the scripts whose official side is one run into an npz file."""
    ap.add_argument("--official-dir", required=True)
    ap.add_argument("--cache", default="/tmp/refq-layers/hessians.npz")
    ap.add_argument("--torch-python", default=TORCH_PYTHON)
    ap.add_argument("--layers", nargs="*", default=layers)
    ap.add_argument("--out-npz", default=out_npz)
    ap.add_argument("--run-official", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="reuse --out-npz from an earlier run")


def npz_main(ap, run_official, script, extra=lambda a: ()):
    """Parse the arguments; with --run-official run the official side and exit;
    else run it (official_npz) -> (args, official W_hat npz, its JSON, the layers npz)."""
    a = ap.parse_args()
    if a.run_official:
        run_official(a)
        sys.exit(0)
    off, offj = official_npz(a, script, extra(a))
    sys.path.insert(0, REPO)
    return a, off, offj, np.load(a.cache)


def official_npz(a, script, extra=()):
    """Run the official side once (unless --reuse finds --out-npz), one thread
    -> (npz of its W_hat, dict of its per-case JSON)."""
    if not (a.reuse and os.path.exists(a.out_npz)):
        subprocess.run([a.torch_python, os.path.abspath(script), "--run-official",
                        "--official-dir", a.official_dir, "--cache", a.cache, *extra,
                        "--out-npz", a.out_npz, "--layers", *a.layers],
                       check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    with open(a.out_npz + ".json") as f:
        return np.load(a.out_npz), json.load(f)


# ---------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------
def machine():
    """'CPU model, nproc N, load average a / b / c' for the table's caption."""
    from refq.machine import cpu_model
    model = cpu_model()
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return f"{model}, nproc {os.cpu_count()}, load average {load}"


def gmean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs))
