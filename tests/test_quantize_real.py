"""GPTQ against RTN on the real model's weights and Hessians (SmolLM2-135M-Instruct).

H is captured from 8 windows of 128 tokens of data/calib.txt at decoder layer 0
and at layer 10 (after layers 0..9 run dense). On those, GPTQ's objective
tr((W-Q) H (W-Q)ᵀ) must beat RTN's at the same bits and groups by a wide margin
(measured, w4 per-channel / w3 g128 / w2 g64 on q, o, up, down of layers 0 and
10: GPTQ/RTN between 0.024 and 0.384; asserted < 0.6), and act_order must not
be worse than plain GPTQ (measured act_order/GPTQ 0.18 to 0.87; asserted
<= 1.05). The losses are in-sample (the H GPTQ was fit to), as in the paper.

One end-to-end `refq quantize --method rtn --bits 4 --group-size 32 --eval`:
the model was shipped as GGUF Q4_1 (blocks of 32, w = d*q + m with a float
offset m), so its weights lie exactly on a 4-bit grid per block of 32; but
RTN's zero point is an integer (GPTQ's convention), which cannot represent m,
so RTN g32 does NOT reproduce that grid: it lands on a shifted one, with a
relative weight error of about 0.09 like a fresh quantization, and perplexity
on the first 512 eval tokens rises by about 21.5% (31.67 -> 38.49). The bound
below (30%) is there to catch a broken pipeline (wrong zero points or scales
give far larger numbers), not to certify quality.
"""
import json
import os

import numpy as np
import pytest

import refq
from conftest import REPO, real_weight

LAYERS = (0, 10)
LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
CONFIGS = [dict(bits=4, group_size=None), dict(bits=3, group_size=128),
           dict(bits=2, group_size=64)]


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("name", LINEARS)
def test_gptq_beats_rtn_on_real_hessians(real_layers, layer, name):
    W, H = real_weight(real_layers, layer, name)                     # (out, in), (in, in)
    lines = []
    for cfg in CONFIGS:
        runs = {"rtn": ("rtn", cfg), "gptq": ("gptq", cfg),
                "act": ("gptq", dict(cfg, act_order=True))}
        loss = {k: refq.layer_loss(W, refq.quantize_weight(W, H, m, **kw).dequantize(), H)
                for k, (m, kw) in runs.items()}
        lines.append(f"w{cfg['bits']} g{cfg['group_size']}: gptq/rtn "
                     f"{loss['gptq'] / loss['rtn']:.3f}, act/gptq {loss['act'] / loss['gptq']:.3f}")
        assert loss["gptq"] < 0.6 * loss["rtn"], lines[-1]
        assert loss["act"] <= 1.05 * loss["gptq"], lines[-1]
    print(f"layer {layer} {name}: " + "; ".join(lines))


def test_rtn_g32_end_to_end(smollm2_path, tmp_path, capsys):
    from refq.cli import main
    out = str(tmp_path / "rtn-w4g32")
    rc = main(["quantize", "--model", smollm2_path, "--method", "rtn", "--bits", "4",
               "--group-size", "32", "--nsamples", "2", "--seqlen", "64", "--out", out,
               "--eval", "--eval-max-tokens", "512", "--json"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    js = json.loads(stdout)
    assert len(js["layers"]) == 30 * 7
    assert js["bits_per_weight"] == 4 + 16 / 32 + 4 / 32          # codes, fp16 scale, zero
    ratio = js["ppl_after"] / js["ppl_before"] - 1
    print(f"ppl {js['ppl_before']:.4f} -> {js['ppl_after']:.4f} (+{100 * ratio:.2f}%), "
          f"{js['seconds']:.1f} s")
    assert 0 <= ratio < 0.30
