"""Load time of a packed checkpoint with and without the sha256 check, and of the
NaN/Inf check (BENCHMARKS.md, issue 15).  python benchmarks/bench_load_checks.py PACKED_DIR"""
import time, sys, statistics
sys.path.insert(0, '.')
from refq.checkpoint import load_packed_model
from refq.loading import check_finite, load_for_inference
from llama_np import load_model
P = sys.argv[1] if len(sys.argv) > 1 else "/tmp/rel_smol_rtn"
from refq.fetch import default_model_path
HF = default_model_path()
load_packed_model(P, verify=False)   # warm page cache + numba
r = {k: [] for k in ("packed_noverify", "packed_verify", "finite_packed", "hf_load", "finite_hf")}
for i in range(5):
    t = time.perf_counter(); m = load_packed_model(P, verify=False); r["packed_noverify"].append(time.perf_counter() - t)
    t = time.perf_counter(); m = load_packed_model(P, verify=True); r["packed_verify"].append(time.perf_counter() - t)
    t = time.perf_counter(); check_finite(m, "x"); r["finite_packed"].append(time.perf_counter() - t)
    t = time.perf_counter(); h = load_model(HF); r["hf_load"].append(time.perf_counter() - t)
    t = time.perf_counter(); check_finite(h, "x"); r["finite_hf"].append(time.perf_counter() - t)
for k, v in r.items():
    print(f"{k:16s} median {statistics.median(v):.3f} s  min {min(v):.3f}  all {[round(x,3) for x in v]}")
