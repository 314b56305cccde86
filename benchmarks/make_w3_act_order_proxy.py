"""A w3 g128 act-order checkpoint of SmolLM2 WITHOUT calibration data (for kernel timing).

    python benchmarks/make_w3_act_order_proxy.py OUT [--bits 3] [--group-size 128]

Writes the same packed format as `refq quantize --method gptq --bits 3
--group-size 128 --act-order` (3-bit codes, fp16 scales, packed zeros and a
stored `perm` per layer), but in seconds instead of the ~50 min of calibration
on a loaded 2-core machine: the columns of each W are put in "act order" by a
proxy of the Hessian diagonal (the column energy Σ_r W[r, c]^2, descending),
then rounded to nearest (refq's RTN) in groups of 128 of that order, and the
permutation is stored as GPTQ stores it. The kernels' speed depends only on the
format, not on the values; the model's quality is RTN's, not GPTQ's.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=128)
    a = p.parse_args()
    from llama_np import load_model
    from refq.api import quantize_weight
    from refq.checkpoint import save_packed
    from refq.formats.uniform import perm_dtype
    from refq.fetch import ensure_default_model
    folder = ensure_default_model()
    model = load_model(folder)
    quantized = {}
    opts = {"bits": a.bits, "group_size": a.group_size}
    for i, layer in enumerate(model.layers):
        for n, lin in layer.linears.items():
            W = np.ascontiguousarray(lin.weight, dtype=np.float32)
            perm = np.argsort(-(W.astype(np.float64) ** 2).sum(axis=0), kind="stable")  # (in,)
            q = quantize_weight(np.ascontiguousarray(W[:, perm]), None, "rtn", **opts)
            q.perm = perm.astype(perm_dtype(W.shape[1]))   # stored column k = original perm[k]
            q._validate()
            quantized[f"model.layers.{i}.{n}"] = q
    save_packed(a.out, folder, model, quantized, {"method": "rtn", "options": dict(opts, act_order_proxy=True)})


if __name__ == "__main__":
    main()
